"""Passkey retrieval: the template (one place, shared by the data script and the evaluation), the fine-tuning
data made from the generated corpus (conftest.py), BPE prompts (conftest's test encoding; GPT-2's too where its
files are cached), the accuracy bookkeeping on stand-in models that solve or fail the task by
construction, and eval_passkey.py's command line on a tiny trained checkpoint."""

import csv
import json
import pickle
import re
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import eval_passkey
from conftest import TEST_ENCODING, make_corpus, run
from dataset import get_tokenizer, model_vocab_size
from eval_passkey import (
    FILLER_SENTENCE,
    evaluate,
    make_trials,
    passkey_example,
    passkey_template,
    score,
)
from model import GPT, GPTConfig
from runs import model_from_checkpoint, save_checkpoint

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--eval_iters=1", "--eval_interval=2",
        "--log_interval=1", "--warmup_iters=1", "--max_iters=2", "--device=cpu"]
EXAMPLE = re.compile(r"^(.*) KEY IS ([A-Z]{5})\. (.*) KEY\? \2$", re.S)


@pytest.fixture(scope="module")
def meta(char_data):
    with open(char_data / "meta.pkl", "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def passkey_data(char_data, tmp_path_factory):
    """data/passkey_char/prepare.py run on the generated corpus, at block_size 32, into a temp folder."""
    out = tmp_path_factory.mktemp("passkey_char")
    r = run("data/passkey_char/prepare.py", "--src", str(char_data), "--out_dir", str(out), "--block_size", "32",
            "--n_train", "300", "--n_val", "20", "--seed", "3")
    assert "300 train and 20 val examples of 33 tokens" in r.stdout
    return out


def test_template_round_trip(meta):
    tpl = passkey_template(meta)
    encode, decode = get_tokenizer(meta)
    assert tpl.char_level and len(tpl.alphabet) == 26 and decode(list(tpl.alphabet)) == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    filler, key = encode("to be, or not to be: that is the question"), encode("QZXKV")
    F = len(filler)
    for depth in (0, 0.25, 0.5, 1):
        ids = passkey_example(tpl, filler, key, depth)
        assert len(ids) == F + tpl.fixed_len(5) and ids[-5:] == key
        cut = round(depth * F)
        text = decode(filler)
        assert decode(ids) == text[:cut] + " KEY IS QZXKV. " + text[cut:] + " KEY? QZXKV"
        assert decode(ids).index(" KEY IS ") == cut  # depth 0: the very start; 1: just before the question
    # the fixed part is compact enough to leave room for filler at the demo's 64 tokens
    assert tpl.fixed_len(5) == 26


def test_trials_are_deterministic_and_shared_across_depths(meta, char_data):
    tpl = passkey_template(meta)
    val = np.fromfile(char_data / "val.bin", dtype=np.uint16)
    depths = [0.0, 0.5, 1.0]
    prompts, keys = make_trials(tpl, val, 100, depths, 4, 5, seed_=7)
    assert prompts.shape == (12, 95) and keys.shape == (12, 5)
    again, keys2 = make_trials(tpl, val, 100, depths, 4, 5, seed_=7)
    assert torch.equal(again, prompts) and torch.equal(keys2, keys)
    assert not torch.equal(make_trials(tpl, val, 100, depths, 4, 5, seed_=8)[0], prompts)
    decode = get_tokenizer(meta)[1]
    for t in range(4):  # trial t: the same key and filler at every depth, only the key sentence moves
        texts = [decode(prompts[i * 4 + t].tolist() + keys[i * 4 + t].tolist()) for i in range(3)]
        parts = [EXAMPLE.match(s).groups() for s in texts]
        assert len({p[1] for p in parts}) == 1 and len({p[0] + p[2] for p in parts}) == 1
        assert [len(p[0]) for p in parts] == [0, 37, 74]  # 74 filler characters at length 100
    # the repeated-sentence filler
    rep = make_trials(tpl, get_tokenizer(meta)[0](FILLER_SENTENCE), 64, [0.0], 2, 5, seed_=1)[0]
    assert decode(rep[0].tolist()).startswith(" KEY IS ") and "The grass is green." in decode(rep[0].tolist())


# a BPE dataset's meta.pkl: the test encoding's, or none at all (GPT-2 BPE, the default)
BPE_METAS = [pytest.param({"vocab_size": 320, "tokenizer": TEST_ENCODING}, id=TEST_ENCODING),
             pytest.param(None, marks=pytest.mark.gpt2_files, id="gpt2")]


@pytest.mark.parametrize("bpe_meta", BPE_METAS)
def test_bpe_template_keys_are_one_token_per_digit(bpe_meta):
    tpl = passkey_template(bpe_meta)
    encode, decode = get_tokenizer(bpe_meta)
    key = [tpl.alphabet[d] for d in (4, 7, 1, 9, 2)]
    ids = passkey_example(tpl, encode(" Once upon a time"), key, 1.0)
    assert decode(ids) == " Once upon a time KEY IS 4 7 1 9 2. KEY? 4 7 1 9 2"
    assert ids[-5:] == key and encode(" KEY? 4 7 1 9 2")[-5:] == key  # the key's canonical tokenisation


@pytest.mark.parametrize("bpe_meta", BPE_METAS)
def test_bpe_checkpoint_end_to_end(tmp_path, bpe_meta):
    """A BPE checkpoint (the test encoding's meta.pkl, or none: GPT-2) through evaluate(): filler from its BPE
    val.bin, digit keys; the bookkeeping reaches 100% with a model that solves the task by construction, on the
    same BPE prompts."""
    encode, decode = get_tokenizer(bpe_meta)
    d = tmp_path / "bpe"
    d.mkdir()
    np.asarray(encode(make_corpus(20000)), dtype=np.uint16).tofile(d / "val.bin")
    if bpe_meta is not None:
        with open(d / "meta.pkl", "wb") as f:
            pickle.dump(bpe_meta, f)
    vocab = model_vocab_size(bpe_meta)  # 50304 for GPT-2
    args = dict(block_size=32, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, attn="lssar")
    save_checkpoint({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "iter_num": 0,
                     "config": {"dataset": "bpe", "data_dir": str(d)}}, str(d / "ckpt.pt"))
    res = evaluate([str(d)], multipliers="1,2", depths="0,1", n_trials=2, device="cpu")
    assert "digits (BPE)" in res["protocol"]["key"] and res["runs"][0]["filler"] == f"val: {d}"
    assert [(x["length"], x["trials"]) for x in res["runs"][0]["results"]] == [(32, 2), (32, 2), (64, 2), (64, 2)]
    for x in res["runs"][0]["results"]:  # an untrained model: wrong, and its outputs decode as BPE text
        assert all(isinstance(w["output"], str) and len(w["key"].split()) == 5 for w in x["wrong_examples"])
    tpl = passkey_template(bpe_meta)
    val = np.fromfile(d / "val.bin", dtype=np.uint16)
    trials = {L: make_trials(tpl, val, L, [0.0, 1.0], 3, 5, seed_=0) for L in (32, 64)}
    prompt = decode(trials[64][0][0].tolist())
    assert prompt.startswith(" KEY IS ") and prompt.endswith(" KEY?") and len(trials[64][0][0]) == 59
    got = score(Copier(tpl, vocab), trials, [0.0, 1.0], 32, decode, nullcontext(), "cpu", 4)
    assert [x["accuracy"] for x in got] == [1.0] * 4


class Copier(torch.nn.Module):
    """Solves the task by construction: after the question, the next key letter is the one at the same offset
    after the key sentence's marker (one-hot logits). `fail_after`: wrong (the next letter of the alphabet)
    whenever the key sentence starts past that fraction of the prompt; `wrong`: always wrong."""

    def __init__(self, tpl, vocab, wrong=False, fail_after=None):
        super().__init__()
        self.tpl, self.vocab, self.wrong, self.fail_after = tpl, vocab, wrong, fail_after

    def forward(self, idx):
        pre, q = list(self.tpl.pre), list(self.tpl.question)
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.vocab)
        for b, seq in enumerate(idx.tolist()):
            qpos = max(i for i in range(len(seq)) if seq[i:i + len(q)] == q)
            kpos = next(i for i in range(qpos) if seq[i:i + len(pre)] == pre) + len(pre)
            nxt = seq[kpos + len(seq) - qpos - len(q)]
            if self.wrong or (self.fail_after is not None and kpos > self.fail_after * len(seq)):
                al = self.tpl.alphabet
                nxt = al[(al.index(nxt) + 1) % len(al)]
            logits[b, -1, nxt] = 1.0
        return logits, None

    def generate(self, idx, n, temperature=0):
        for _ in range(n):
            idx = torch.cat([idx, self(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx


def test_accuracy_of_forced_models(meta, char_data):
    tpl = passkey_template(meta)
    val = np.fromfile(char_data / "val.bin", dtype=np.uint16)
    decode = get_tokenizer(meta)[1]
    depths = [0.0, 0.25, 0.75, 1.0]
    trials = {L: make_trials(tpl, val, L, depths, 6, 5, seed_=0) for L in (64, 128)}

    def acc(model):  # batch 7: batches that cut across depths and lengths
        res = score(model, trials, depths, 64, decode, nullcontext(), "cpu", 7)
        return {(x["length"], x["depth"]): (x["accuracy"], x["correct"], x["trials"]) for x in res}

    V = meta["vocab_size"]
    assert set(acc(Copier(tpl, V)).values()) == {(1.0, 6, 6)}
    assert set(acc(Copier(tpl, V, wrong=True)).values()) == {(0.0, 0, 6)}
    half = acc(Copier(tpl, V, fail_after=0.5))  # right when the key is early in the prompt: per-depth bookkeeping
    assert all(half[L, d][0] == (1.0 if d < 0.5 else 0.0) for L, d in half)
    res = score(Copier(tpl, V, wrong=True), trials, depths, 64, decode, nullcontext(), "cpu", 20)
    assert res[0]["token_accuracy"] == 0 and len(res[0]["wrong_examples"]) == 2
    assert res[-1]["multiplier"] == 2.0


def test_prepare(passkey_data, char_data, meta):
    with open(passkey_data / "meta.pkl", "rb") as f:
        pk_meta = pickle.load(f)
    assert {k: pk_meta[k] for k in meta} == meta and pk_meta["passkey_src"] == str(char_data)  # same vocabulary
    decode = get_tokenizer(meta)[1]
    for split, n in (("train", 300), ("val", 20)):
        data = np.fromfile(passkey_data / f"{split}.bin", dtype=np.uint16)
        src = decode(np.fromfile(char_data / f"{split}.bin", dtype=np.uint16).tolist())
        assert len(data) == n * 33
        cuts = []
        for ex in data.reshape(n, 33):
            m = EXAMPLE.match(decode(ex.tolist()))
            assert m, decode(ex.tolist())
            assert m.group(1) + m.group(3) in src  # filler: one contiguous window of the same split
            cuts.append(len(m.group(1)))
        assert min(cuts) <= 1 and max(cuts) >= 5  # random depths over the 7 filler characters
    r = run("data/passkey_char/prepare.py", "--src", str(passkey_data / "missing"), "--out_dir",
            str(passkey_data / "x"), check=False)
    assert r.returncode != 0 and "python data/shakespeare_char/prepare.py" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (passkey_data / "x").exists()


def test_cli_on_a_tiny_finetuned_checkpoint(passkey_data, char_data, tmp_path):
    """An LSSA base run fine-tuned on passkey data with the re-weighting switched on (--finetune_reweight_p=15),
    then both evaluated as trained and with an eval-time p (--reweight_p=ckpt,0)."""
    base, ft = tmp_path / "base", tmp_path / "ft"
    run("train.py", f"--data_dir={char_data}", f"--out_dir={base}", "--block_size=32", "--attn=lssa", *TINY)
    r = run("train.py", "config/finetune_passkey_char.py", f"--data_dir={passkey_data}", f"--init_from={base}",
            f"--out_dir={ft}", "--block_size=32", "--window_align=33", "--finetune_reweight_p=15", *TINY)
    assert "fine-tuning" in r.stdout and "attention lssar backend=" in r.stdout
    margs = torch.load(ft / "ckpt.pt", weights_only=False)["model_args"]
    assert (margs["attn"], margs["reweight_p"]) == ("lssa", 15.0)  # what sample.py / eval_* rebuild
    r = run("train.py", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'x'}", "--finetune_reweight_p=15", *TINY,
            check=False)
    assert r.returncode != 0 and "set --reweight_p instead" in r.stderr and not (tmp_path / "x").exists()
    out = tmp_path / "res" / "pk"
    r = run("eval_passkey.py", f"--ckpts={base},{ft}", "--multipliers=1,2", "--depths=0,1", "--trials=3",
            "--reweight_p=ckpt,0", f"--out={out}", "--device=cpu")
    assert "passkey accuracy (%)" in r.stdout and "protocol:" in r.stdout
    res = json.loads((tmp_path / "res" / "pk.json").read_text())
    assert res["command"].startswith("python eval_passkey.py") and len(res["runs"]) == 4
    assert [(x["label"], x["reweight_p"], x["trained_reweight_p"]) for x in res["runs"]] == [
        ("base", 0, 0), ("base (eval p=0)", 0, 0), ("ft", 15, 15), ("ft (eval p=0)", 0, 15)]
    # the fine-tuned run reads its filler from the dataset its passkey data was made from, not its own val.bin
    assert {x["filler"] for x in res["runs"]} == {f"val: {char_data}"}
    with open(tmp_path / "res" / "pk.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 * 2 and list(rows[0]) == ["ckpt", "label", "length", "multiplier", "depth",
                                                       "accuracy", "trials"]
    assert {r["length"] for r in rows} == {"32", "64"} and all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert (tmp_path / "res" / "pk.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "res" / "pk.png").unlink()  # --replot redraws the heatmaps (2 rows here) from the JSON alone
    r = run("eval_passkey.py", f"--replot={out}.json")
    assert "ft (eval p=0)" in r.stdout and (tmp_path / "res" / "pk.png").read_bytes()[:4] == b"\x89PNG"


def test_errors(char_data, meta, tmp_path, monkeypatch):
    args = dict(block_size=32, vocab_size=meta["vocab_size"], n_layer=1, n_head=2, n_embd=16, attn="softmax", pos="learned")
    d = tmp_path / "learned"
    d.mkdir()
    save_checkpoint({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "iter_num": 0,
                     "config": {"dataset": "shakespeare_char", "data_dir": str(char_data)}}, str(d / "ckpt.pt"))
    with pytest.raises(SystemExit, match="learned position embeddings.*block_size=32"):
        evaluate([str(d)], multipliers="1,2", n_trials=2, device="cpu")
    assert evaluate([str(d)], multipliers="1", depths="0.5", n_trials=2, device="cpu")["runs"][0]["results"][0]["trials"] == 2
    built = []  # the models evaluate() builds: an eval-time p reaches the attention, "ckpt" keeps the trained one
    monkeypatch.setattr(eval_passkey, "model_from_checkpoint",
                        lambda *a, **o: built.append(model_from_checkpoint(*a, **o)) or built[-1])
    res = evaluate([str(d)], multipliers="1", depths="0.5", n_trials=2, device="cpu", reweight_p="ckpt,15")
    assert [m.config.reweight_p for m in built] == [0, 15] and res["runs"][1]["label"] == "learned (eval p=15)"
    with pytest.raises(SystemExit, match="eval error: .*reweight_p must be >= 0"):
        evaluate([str(d)], multipliers="1", n_trials=2, device="cpu", reweight_p="-1")
    with pytest.raises(SystemExit, match="length 16 is too short for the template"):
        evaluate([str(d)], lengths="16", n_trials=2, device="cpu")
    with pytest.raises(SystemExit, match="depths must be fractions"):
        evaluate([str(d)], multipliers="1", depths="0,2", device="cpu")
    r = run("eval_passkey.py", f"--ckpts={tmp_path / 'missing'}", "--device=cpu", check=False)
    assert r.returncode != 0 and "checkpoint not found" in r.stderr
