"""The retrieval task (retrieval.py), its dataset (data/retrieval_char/prepare.py), the answers train.py logs and
the evaluation (eval_retrieval.py): episodes as specified (keys unique, every query after its pair, answers its
pair's value), prompts at the distance asked and the same for a seed, the token roles, scoring that gives a copying
model 100% and a wrong one 0%, the scripts end to end on the test corpus, and bad input as one line."""

import csv
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval_retrieval as ER
from conftest import ROOT, make_corpus, run
from retrieval import CURRICULUM, QUERY, Task, alphabet, pair_text, prompt, score, token_roles, training_example

TASK = Task(key_len=1, value_len=3, max_pairs=6, max_queries=6, share=1.0)
TEXT = make_corpus(20_000, seed=3)
PAIR_RE = re.compile(r"\[(\d)([a-z]+)\]")  # (key_len 1, as TASK)
QUERY_RE = re.compile(r"\{(\d)([a-z]+)\}")


@pytest.mark.parametrize("task", [TASK, Task(key_len=1, value_len=5, max_pairs=4, max_queries=2, share=1.0)])
def test_training_examples_are_episodes_as_specified(task):
    rng = np.random.default_rng(0)
    dists = []
    for _ in range(300):
        s = int(rng.integers(0, len(TEXT) - 200))
        text, asked = training_example(TEXT[s:s + 129], rng, task, 129)
        assert len(text) == 129
        pairs = {m.group(1): (m.start(), m.group(2)) for m in PAIR_RE.finditer(text)}
        assert len(pairs) == len(PAIR_RE.findall(text)) >= 1  # keys unique within the window
        assert all(len(k) == task.key_len and len(v) == task.value_len for k, (_, v) in pairs.items())
        queries = [(m.start(), m.group(1), m.group(2)) for m in QUERY_RE.finditer(text)]
        assert len(queries) == len(asked) >= 1
        for (q_start, key, value), (k2, p_start, q2) in zip(queries, sorted(asked, key=lambda a: a[2]), strict=True):
            assert (key, q_start) == (k2, q2) and pairs[key] == (p_start, value)  # a query answers its pair's value
            assert p_start < q_start
            dists.append(q_start - p_start)
        # the filler is the text, in order, around the items
        assert PAIR_RE.sub("", QUERY_RE.sub("", text)) == TEXT[s:s + 129 - task.item_len * (len(pairs) + len(queries))]
    assert min(dists) == task.item_len and max(dists) > 90  # distances over the whole window


def test_share_zero_is_text_and_the_same_seed_gives_the_same_window():
    rng = np.random.default_rng(1)
    assert training_example(TEXT[:129], rng, Task(share=0.0), 129) == (TEXT[:129], [])
    a = training_example(TEXT[:129], np.random.default_rng(5), TASK, 129)
    assert a == training_example(TEXT[:129], np.random.default_rng(5), TASK, 129)
    assert a != training_example(TEXT[:129], np.random.default_rng(6), TASK, 129)


@pytest.mark.parametrize("near", ["adjacent", "span", "crossed"])
@pytest.mark.parametrize("max_distance", [6, 9, 20, 120])
def test_near_episodes_keep_every_query_within_max_distance_of_its_pair(max_distance, near):
    """The curriculum's episodes: each query at most max_distance characters after its pair, answering its value;
    the distances fill 6 .. max_distance as far as the window allows. adjacent: the item before a query is its own
    pair; span: once the span holds two pairs, some queries have another pair between them and their own; crossed:
    every query does (its distances from 2 items, 12 characters, up)."""
    rng = np.random.default_rng(max_distance)
    dists, crossed = [], []
    for _ in range(300):
        s = int(rng.integers(0, len(TEXT) - 200))
        text, asked = training_example(TEXT[s:s + 129], rng, TASK, 129, max_distance=max_distance, near=near)
        assert len(text) == 129
        pairs = {m.group(1): (m.start(), m.group(2)) for m in PAIR_RE.finditer(text)}
        assert len(pairs) == len(PAIR_RE.findall(text)) >= 1
        items = sorted([(m.start(), "pair", m.group(1)) for m in PAIR_RE.finditer(text)]
                       + [(m.start(), "query", m.group(1)) for m in QUERY_RE.finditer(text)])
        for (_, kind, key), (_, kind2, key2) in zip(items, items[1:], strict=False):
            if kind2 == "query" and near == "adjacent":
                assert (kind, key) == ("pair", key2)  # the item before a query is its own pair
        assert len(asked) == len(QUERY_RE.findall(text)) >= 1
        for key, p_start, q_start in asked:
            assert pairs[key][0] == p_start and text[q_start:q_start + TASK.item_len] == f"{{{key}{pairs[key][1]}}}"
            assert TASK.item_len <= q_start - p_start <= max(max_distance, 12 if near == "crossed" else 0)
            dists.append(q_start - p_start)
            crossed.append(any(p_start < p < q_start for p, _ in pairs.values()))
        assert PAIR_RE.sub("", QUERY_RE.sub("", text)) == TEXT[s:s + 129 - TASK.item_len * len(items)]
    top = max(max_distance, 12) if near == "crossed" else max_distance
    low = 12 if near == "crossed" else TASK.item_len
    assert (min(dists), max(dists)) == (low, top) if top < 60 else (min(dists) < 20 and max(dists) > 90)
    if near == "crossed":
        assert all(crossed)
    else:
        assert any(crossed) == (near == "span" and max_distance >= 2 * TASK.item_len)
    with pytest.raises(ValueError, match="shorter than a pair"):
        training_example(TEXT[:129], rng, TASK, 129, max_distance=5, near=near)


def test_the_crossed_split_separates_a_key_reader_from_a_nearest_pair_copier():
    """eval_retrieval's 'pair between' split: a prompt is crossed when a distractor pair lies between the target pair
    and the query. A model that copies the nearest pair's value whatever its key scores 100% on the other prompts
    and 0% on the crossed ones; one that reads the key scores 100% on both."""
    chars = alphabet(TEXT)
    stoi = {c: i for i, c in enumerate(chars)}
    j = {"meta": {"itos": dict(enumerate(chars)), "stoi": stoi}, "text": np.array([stoi[c] for c in TEXT]),
         "task": TASK}
    nearest, reader, crossed_all = [], [], []
    for cell in ER.cells(64, [1, 4, 16], [0, 1, 2, 4, 8, 16], TASK):
        x, truth, dists, crossed = ER.make_prompts(j, cell, 10, 7, 4)
        for ids, t, d, c in zip(x.tolist(), truth, dists, crossed, strict=True):
            body = "".join(chars[i] for i in ids)
            pairs = list(PAIR_RE.finditer(body))
            target = len(body) - TASK.key_len - d - 1  # the target pair's `[`
            assert c == any(m.start() > target for m in pairs)
            nearest.append((pairs[-1].group(2) == t, c))
            reader.append(([m.group(2) for m in pairs if m.group(1) == body[-1]] == [t], c))
            crossed_all.append(c)
    assert 0 < sum(crossed_all) < len(crossed_all)
    assert all(ok != c for ok, c in nearest) and all(ok for ok, _ in reader)
    run_ = {"cells": [{"crossed": 3, "crossed_right": 1}, {"crossed": 1, "crossed_right": 1}, {"crossed": 0,
                                                                                               "crossed_right": 0}]}
    assert ER.crossed_accuracy(run_) == (0.5, 4) and ER.crossed_accuracy({"cells": [{}]}) == (None, 0)


@pytest.mark.parametrize("length,distance", [(129, 7), (129, 118), (1000, 500), (2048, 2030)])
def test_prompts_put_the_key_at_the_distance_asked(length, distance):
    rng = np.random.default_rng(length + distance)
    body, value, key = prompt(TEXT[:length], rng, TASK, length, distance, 4)
    assert len(body) + TASK.value_len == length
    assert body.endswith(f"{QUERY[0]}{key}")
    q_key = len(body) - TASK.key_len
    p_key = q_key - distance
    assert body[p_key - 1:p_key - 1 + TASK.item_len] == pair_text(key, value)
    pairs = PAIR_RE.findall(body)
    assert len(pairs) == 5 and len({k for k, _ in pairs}) == 5  # 4 distractors, keys unlike the target's
    assert [v for k, v in pairs if k == key] == [value]
    again = prompt(TEXT[:length], np.random.default_rng(length + distance), TASK, length, distance, 4)
    assert again == (body, value, key)


def test_a_distance_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        prompt(TEXT[:100], np.random.default_rng(0), TASK, 100, 96, 2)
    with pytest.raises(ValueError, match="does not fit"):
        prompt(TEXT[:100], np.random.default_rng(0), TASK, 100, 3, 2)


def test_token_roles_find_answers_and_text():
    chars = alphabet(TEXT)
    stoi = {c: i for i, c in enumerate(chars)}
    window = "ab [3xyz] cd {3xyz} e{4qq"
    ids = torch.tensor([[stoi[c] for c in window]])
    answer, query, text = token_roles(ids[:, :-1], ids[:, 1:], stoi, 1)
    targets = window[1:]
    assert "".join(c for c, a in zip(targets, answer[0].tolist(), strict=True) if a) == "xyzqq"
    assert "".join(c for c, t in zip(targets, text[0].tolist(), strict=True) if t) == "b  cd  e"
    assert query[0][answer[0]].tolist() == [13, 13, 13, 21, 21]  # grouped by their query's `{`


class Copier:
    """A stand-in model whose greedy answer is the value of the pair with the query's key (right), or of another
    pair (wrong): eval_retrieval's decode and score see only generate()."""

    def __init__(self, itos, stoi, right=True):
        self.itos, self.stoi, self.right = itos, stoi, right

    def generate(self, x, n, temperature=0):
        out = []
        for row in x.tolist():
            text = "".join(self.itos[i] for i in row)
            key = text[text.rindex(QUERY[0]) + 1:]
            pairs = PAIR_RE.findall(text)
            value = next(v for k, v in pairs if (k == key) == self.right)
            out.append(row + [self.stoi[c] for c in value[:n]])
        return torch.tensor(out)


def test_scoring_gives_a_copier_all_and_a_wrong_model_nothing():
    chars = alphabet(TEXT)
    meta = {"itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    j = {"meta": meta, "task": TASK, "text": np.array([meta["stoi"][c] for c in TEXT], dtype=np.uint16)}
    for cell in ER.cells(64, [1, 4, 16], [0, 1, 2, 4, 8, 16], TASK):
        x, truth, dists, _ = ER.make_prompts(j, cell, 6, 1337, 4)
        assert all(cell[3][0] <= d <= cell[3][1] for d in dists)
        for right, want in ((True, 1.0), (False, 0.0)):
            got = ER.decode(Copier(meta["itos"], meta["stoi"], right), x, TASK.value_len, torch.no_grad(), "cpu", 4)
            exact, chars_right, n = score([ER.text_of(g, meta["itos"]) for g in got], truth)
            assert exact / len(truth) == want and (chars_right == n) == right
    assert score(["abc", "abd"], ["abc", "abc"]) == (1, 5, 6)


def test_cells_cover_the_bins_that_fit():
    cells = ER.cells(128, [1, 16], [0, 1, 2, 4, 8, 16], TASK)
    assert [(c[1], c[2]) for c in cells] == [(1, (0, 1)), (16, (0, 1)), (16, (1, 2)), (16, (2, 4)), (16, (4, 8)),
                                             (16, (8, 16))]
    assert cells[0][3] == (TASK.item_len, 128 - TASK.value_len - TASK.key_len - 1)
    assert cells[-1][3] == (1024, 2048 - 3 - 1 - 1)


# ----------------------------------------------------------------------------------------------------
# the scripts
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory, corpus_file):
    """A tiny model trained a few steps on a retrieval dataset prepared from the test corpus."""
    tmp = tmp_path_factory.mktemp("retrieval")
    data = tmp / "data"
    run("data/retrieval_char/prepare.py", "--input", str(corpus_file), "--out_dir", str(data), "--block_size=32",
        "--n_train=400", "--n_val=40", "--key_len=1", "--max_pairs=2", "--max_queries=2", "--share=0.8")
    out = tmp / "run"
    r = run("train.py", "config/train_retrieval_char.py", f"--data_dir={data}", f"--out_dir={out}", "--n_layer=1",
            "--n_head=2", "--n_embd=32", "--block_size=32", "--window_align=33", "--batch_size=4", "--max_iters=4",
            "--eval_interval=2", "--eval_iters=2", "--log_interval=1", "--warmup_iters=1", "--device=cpu")
    return tmp, data, out, r


def test_prepare_is_deterministic_and_train_logs_the_answers(retrieval_run, tmp_path, corpus_file):
    tmp, data, out, r = retrieval_run
    run("data/retrieval_char/prepare.py", "--input", str(corpus_file), "--out_dir", str(tmp_path), "--block_size=32",
        "--n_train=400", "--n_val=40", "--key_len=1", "--max_pairs=2", "--max_queries=2", "--share=0.8")
    for f in ("train.bin", "val.bin", "text_val.bin", "meta.pkl"):
        assert (tmp_path / f).read_bytes() == (data / f).read_bytes(), f
    assert os.path.getsize(data / "train.bin") == 400 * 33 * 2
    assert "answers: loss" in r.stdout
    header, *rows = [line.split(",") for line in (out / "log.csv").read_text().splitlines()]
    assert header[-4:] == ["val_text", "val_answer_loss", "val_answer_char", "val_answer_exact"]
    evals = [row for row in rows if row[1] == "eval"]
    assert len(evals) == 3 and all(float(row[-3]) > 0 and 0 <= float(row[-1]) <= 1 for row in evals)


def test_eval_retrieval_end_to_end(retrieval_run):
    tmp, _, out, _ = retrieval_run
    prefix = tmp / "res" / "ev"
    r = run("eval_retrieval.py", f"--ckpts={out}", "--lengths=1,4", "--bins=0,1,2,4", "--prompts=3", "--lm_tokens=256",
            f"--out={prefix}", "--device=cpu")
    res = json.loads((tmp / "res" / "ev.json").read_text())
    [rr] = res["runs"]
    assert [(c["multiple"], c["bin"]) for c in rr["cells"]] == [(1, [0, 1]), (4, [0, 1]), (4, [1, 2]), (4, [2, 4])]
    assert all(c["prompts"] == 3 and 0 <= c["exact"] <= 1 for c in rr["cells"])
    assert all(0 <= c["crossed_right"] <= c["crossed"] <= 3 for c in rr["cells"]) and "between" in r.stdout
    assert [x["length"] for x in rr["lm"]] == [32, 128] and rr["attn"] == "softmax"
    for f in ("ev.csv", "ev.md", "ev.png", "ev_distance.png"):
        assert (tmp / "res" / f).stat().st_size > 0
    assert "exact-match accuracy" in r.stdout and res["command"].startswith("python eval_retrieval.py")
    # the same prompts, the same answers: a second evaluation repeats the first exactly
    run("eval_retrieval.py", f"--ckpts={out}", "--lengths=1,4", "--bins=0,1,2,4", "--prompts=3", "--lm_tokens=256",
        f"--out={tmp / 'res' / 'again'}", "--device=cpu")
    again = json.loads((tmp / "res" / "again.json").read_text())["runs"][0]
    assert [c["exact"] for c in again["cells"]] == [c["exact"] for c in rr["cells"]] and again["lm"] == rr["lm"]
    (tmp / "res" / "ev.png").unlink()
    run("eval_retrieval.py", f"--replot={tmp / 'res' / 'ev.json'}")
    assert (tmp / "res" / "ev.png").stat().st_size > 0


@pytest.mark.parametrize("args,msg", [
    (["--lengths=1,0"], "lengths must be multiples of T in (0, 1024]"),
    (["--bins=0,4,2"], "bins must be at least two increasing edges"),
    (["--bins=8,16", "--lengths=1,4"], "no distance bin starts below the longest length"),
    (["--prompts=0"], "prompts=0 is out of range"),
    (["--distractors=-1"], "distractors=-1 is out of range"),
    (["--lengths=1,x"], "'x' is not a number"),
    (["--out="], "out names the result files"),
])
def test_bad_options_are_one_line(retrieval_run, args, msg):
    tmp, _, out, _ = retrieval_run
    r = subprocess.run([sys.executable, "eval_retrieval.py", f"--ckpts={out}", f"--out={tmp / 'bad' / 'x'}", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and msg in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp / "bad").exists()


def test_a_model_trained_without_the_task_is_refused(char_data, tmp_path):
    out = tmp_path / "lm"
    run("train.py", "config/train_shakespeare_char.py", f"--data_dir={char_data}", f"--out_dir={out}", "--n_layer=1",
        "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--max_iters=1", "--eval_iters=1",
        "--device=cpu")
    r = run("eval_retrieval.py", f"--ckpts={out}", f"--out={tmp_path / 'res' / 'x'}", check=False)
    assert r.returncode == 1 and "has no retrieval task" in r.stderr and not (tmp_path / "res").exists()


def test_prepare_refuses_bad_settings_and_markers_in_the_text(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a text with a [bracket] in it\n" * 200)
    for args, msg in ((["--input", str(text)], "the task's markers"),
                      (["--input", str(text), "--max_queries=5"], "max_queries=5 > max_pairs=4"),
                      (["--input", str(text), "--block_size=20"], "do not fit a window of 21"),
                      (["--input", str(text), "--share=1.5"], "share=1.5 is out of range"),
                      (["--input", str(text), "--curriculum=-1"], "curriculum=-1 is out of range"),
                      (["--input", str(text), "--near_share=0"], "near_share=0.0 is out of range"),
                      (["--input", str(text), "--near=adjacent,diagonal"], "near is adjacent, span or crossed")):
        r = run("data/retrieval_char/prepare.py", *args, "--out_dir", str(tmp_path / "out"), check=False)
        assert r.returncode == 1 and msg in r.stderr.strip().splitlines()[-1], r.stderr
        assert not (tmp_path / "out").exists()


def test_a_curriculum_is_written_in_order_and_read_in_order(tmp_path, corpus_file):
    """prepare --curriculum=N: the first N training windows hold near episodes whose longest distance grows to the
    window, the rest the usual ones; train.py refuses to draw such data at random and reads it in order with
    --data_order=sequential (batch k: windows k * batch .. k * batch + batch - 1)."""
    data = tmp_path / "data"
    run("data/retrieval_char/prepare.py", "--input", str(corpus_file), "--out_dir", str(data), "--block_size=32",
        "--n_train=600", "--n_val=40", "--max_pairs=2", "--max_queries=2", "--curriculum=400")
    with open(data / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta["retrieval"]["curriculum"] == 400
    itos = meta["itos"]
    windows = ["".join(itos[int(i)] for i in w) for w in np.fromfile(data / "train.bin", dtype=np.uint16).reshape(600, 33)]
    longest = []
    for w in windows:
        pairs = {m.group(1): m.start() for m in PAIR_RE.finditer(w)}
        longest.append(max(m.start() - pairs[m.group(1)] for m in QUERY_RE.finditer(w)))
    first, last = np.array(longest[:100]), np.array(longest[300:400])
    assert first.max() <= 6 + (32 - 6) * 100 // 400 and last.mean() > first.mean() + 3  # growing
    assert max(longest[400:]) > max(longest[:100])
    # a mixed curriculum: about half of those windows near, the others usual (past the bound), kind and share in meta
    mixed = tmp_path / "mixed"
    run("data/retrieval_char/prepare.py", "--input", str(corpus_file), "--out_dir", str(mixed), "--block_size=32",
        "--n_train=600", "--n_val=40", "--max_pairs=2", "--max_queries=2", "--curriculum=400", "--near=span",
        "--near_share=0.5")
    with open(mixed / "meta.pkl", "rb") as f:
        m2 = pickle.load(f)["retrieval"]
    assert (m2["curriculum"], m2["near"], m2["near_share"]) == (400, "span", 0.5) and "near" not in meta["retrieval"]
    past = 0
    for i, w in enumerate(np.fromfile(mixed / "train.bin", dtype=np.uint16).reshape(600, 33)[:200]):
        w = "".join(itos[int(t)] for t in w)
        pairs = {m.group(1): m.start() for m in PAIR_RE.finditer(w)}
        past += max(m.start() - pairs[m.group(1)] for m in QUERY_RE.finditer(w)) > 6 + (32 - 6) * i // 400
    assert 20 < past < 100
    # two kinds in turn: the first half of the curriculum adjacent (the pair right before each query), then crossed
    two = tmp_path / "two"

    def nearest_is_own(folder, near):  # per curriculum window: is the pair nearest before each query its own?
        run("data/retrieval_char/prepare.py", "--input", str(corpus_file), "--out_dir", str(folder), "--block_size=32",
            "--n_train=500", "--n_val=40", "--max_pairs=3", "--max_queries=2", "--curriculum=400", f"--near={near}")
        out = []
        for w in np.fromfile(folder / "train.bin", dtype=np.uint16).reshape(500, 33)[:400]:
            w = "".join(itos[int(t)] for t in w)
            items = sorted([(m.start(), "p", m.group(1)) for m in PAIR_RE.finditer(w)]
                           + [(m.start(), "q", m.group(1)) for m in QUERY_RE.finditer(w)])
            out.append(all(next(k for _, kind, k in reversed(items[:j]) if kind == "p") == key
                           for j, (_, kind, key) in enumerate(items) if kind == "q"))
        return out

    nearest_own = nearest_is_own(two, "adjacent,crossed")
    assert all(nearest_own[:200]) and not any(nearest_own[200:])
    # a mix: each curriculum window adjacent or crossed at random
    mix = nearest_is_own(tmp_path / "mix", "adjacent+crossed")
    assert 120 < sum(mix) < 280
    common = ["config/train_retrieval_char_curriculum.py", f"--data_dir={data}", "--n_layer=1", "--n_head=2",
              "--n_embd=32", "--block_size=32", "--window_align=33", "--batch_size=4", "--max_iters=2",
              "--eval_iters=1", "--device=cpu"]
    r = run("train.py", *common, f"--out_dir={tmp_path / 'rand'}", "--data_order=random", check=False)
    assert r.returncode == 1 and "--data_order=sequential" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "rand").exists()
    r = run("train.py", *common, f"--out_dir={tmp_path / 'seq'}", "--data_order=sideways", check=False)
    assert r.returncode == 1 and "data_order is random or sequential" in r.stderr
    run("train.py", *common, f"--out_dir={tmp_path / 'seq'}")
    ckpt = torch.load(tmp_path / "seq" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["data_order"] == "sequential"
    from dataset import PREPARE_HINT  # the error message's command makes the recipe's data
    assert f"--curriculum={CURRICULUM} " in PREPARE_HINT["retrieval_char_curriculum"] + " "


def test_sequential_windows_read_the_stored_order():
    from dataset import random_windows, sequential_windows
    parts = [np.arange(10 * 33, dtype=np.uint16), np.arange(5 * 33, dtype=np.uint16)]  # 10 + 5 windows of 33
    seen = [sequential_windows(parts, 4, 32, it, m, 2, align=33) for it in range(2) for m in range(2)]
    flat = [w * 10 + o // 33 for locs in seen for w, o in locs]  # (part, offset) -> window number
    assert flat == list(range(15)) + [0]  # in order across the parts, wrapping at the end
    assert sequential_windows(parts, 4, 32, 1, 0, 2, align=33) == seen[2]  # a pure function of the step
    assert random_windows(parts, 4, 32, 0, 0, 0, align=33) != seen[0]


def test_the_retrieval_gate_needs_every_seed_within_T(tmp_path):
    """sweep.within_T: a row reads when every seed answered >= 95% of its validation windows' queries (distances < T)
    at its last training evaluation (log.csv); the evaluation's length-T, d < T cell goes beside it; a seed without
    that number leaves the gate unknown; an evaluation without that cell has no gate."""
    from sweep import trained_exact, within_T

    def cell(multiple, bin_, per_seed):
        return {"multiple": multiple, "bin": bin_, "exact": float(np.mean(per_seed)), "exact_std": 0.0,
                "per_seed": per_seed}
    cells = [cell(2, [0, 1], [0.0, 0.0]), cell(1, [0, 1], [0.5, 0.25])]
    got = within_T(cells, [1.0, 0.95])
    assert got["reads"] is True and (got["exact"], got["per_seed"]) == (0.375, [0.5, 0.25])
    assert got["trained_mean"] == pytest.approx(0.975) and got["trained_std"] == pytest.approx(np.std([1, .95], ddof=1))
    assert within_T(cells, [1.0, 0.94])["reads"] is False
    assert within_T(cells, [1.0, None])["reads"] is None
    assert within_T([cell(2, [0, 1], [1.0]), cell(1, [1, 2], [1.0])], [1.0]) is None
    (tmp_path / "log.csv").write_text("iter,kind,val_answer_exact\n0,eval,0.1\n5,train,\n9,eval,0.96\n10,train,\n")
    assert trained_exact(tmp_path) == 0.96 and trained_exact(tmp_path / "nowhere") is None


def test_sweep_with_the_retrieval_evaluator(retrieval_run, tmp_path):
    """sweep.py --evaluator=retrieval: runs (a stack among them) x seeds trained on the retrieval data, each
    evaluated by eval_retrieval and kept under <results>_evals/ as it is made (a rerun evaluates nothing again),
    rows with mean and std over seeds, the table and both plots."""
    _, data, _, _ = retrieval_run
    cmd = [sys.executable, "sweep.py", "--runs=softmax,[softmax:window=8,lssar:pos=none]", "--seeds=1337,1",
           "--config=config/train_retrieval_char.py", "--dataset=retrieval_char", f"--data_dir={data}",
           f"--out_root={tmp_path}", "--evaluator=retrieval", "--retrieval_lengths=1,2", "--retrieval_bins=0,1,2",
           "--retrieval_prompts=3", "--eval_extra=", "--max_iters=2", f"--results={tmp_path / 'res' / 'sweep'}",
           "--device=cpu", "--train_args=--n_layer=2 --n_head=2 --n_embd=32 --block_size=32 --window_align=33 "
           "--batch_size=4 --eval_iters=1 --eval_interval=2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "res" / "sweep.json").read_text())
    assert [(row["label"], row["n"]) for row in res["rows"]] == [("softmax", 2), ("[softmax:window=8,lssar:pos=none]", 2)]
    row = res["rows"][1]
    assert row["attn"] == "layers=softmax:window=8,lssar:pos=none" and [b["bin"] for b in row["by_bin"]] == [[0, 1], [1, 2]]
    per = [r["cells"][0]["exact"] for r in res["runs"] if r["label"] == row["label"]]
    assert row["cells"][0]["exact"] == pytest.approx(np.mean(per)) and row["cells"][0]["per_seed"] == per
    md = (tmp_path / "res" / "sweep.md").read_text()
    assert "| [softmax:window=8,lssar:pos=none] | 2 |" in md and "0-1T" in md and "LM 1x" in md
    assert "pair between" in md and 0 <= row["crossed_exact"] <= 1 and row["crossed_prompts"] > 0
    gate, cell = row["within_T"], next(c for c in row["cells"] if c["multiple"] == 1 and c["bin"] == [0, 1])
    from sweep import trained_exact
    logs = [trained_exact(r["ckpt"]) for r in res["runs"] if r["label"] == row["label"]]
    assert gate["per_seed"] == cell["per_seed"] and gate["trained"] == logs and None not in logs
    assert gate["reads"] == all(x >= 0.95 for x in logs)
    assert "| run | n | trained | L=T, d<T | reads | 0-1T |" in md and "'reads': every seed answered >= 95%" in md
    for f in ("sweep.png", "sweep_distance.png", "sweep_training.png"):
        assert (tmp_path / "res" / f).stat().st_size > 0
    with open(tmp_path / "res" / "sweep.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    cell = next(x for x in lines if x["label"] == row["label"] and x["kind"] == "exact")
    assert (cell["multiple"], cell["bin_start"], cell["seeds"]) == ("1", "0", "1337 1")
    assert float(cell["mean"]) == pytest.approx(row["cells"][0]["exact"], abs=1e-4)
    assert [float(x) for x in cell["per_seed"].split()] == pytest.approx(per, abs=1e-4)
    assert sum(x["kind"] == "lm" for x in lines) == 2 * len(row["lm"])
    assert len(list((tmp_path / "res" / "sweep_evals").glob("*.json"))) == 4
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "4 of 4 evaluations reused" in again.stdout + again.stderr, again.stderr[-2000:]
    assert json.loads((tmp_path / "res" / "sweep.json").read_text())["rows"] == res["rows"]
