"""Bad input on every command line: one line naming the fix, a non-zero exit, no traceback, and no file written
or changed. The command-line cases run the scripts as a user would (all at once, to keep this file fast); the
shared parsers and the configurator get property tests: any text either parses or stops with one line."""

import hashlib
import os
import pickle
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_eval_length import make_run

import dataset
import options
import runs
from configurator import configure
from conftest import ROOT
from eval_length import eval_lengths, token_budget
from options import check_range, parse_names, parse_numbers, parse_reweight_list

PROPERTY = settings(max_examples=200, deadline=None)
TRAIN = ["train.py", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--eval_iters=1",
         "--max_iters=1", "--eval_interval=1", "--device=cpu"]


def snapshot(folder):
    """{relative path: sha256} of every file under folder, None when it does not exist."""
    if not os.path.exists(folder):
        return None
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


# name -> (command line, what its last stderr line must say, folders that must stay as they were, offline);
# the words in capitals are filled in by `paths` below
CASES = {
    # eval_length.py: lists, lengths, tokens, stride, files
    "eval_length multipliers 1,0,-2": ("eval_length.py --ckpts=LSSA --multipliers=1,0,-2 --out=OUT/ev",
                                       "multipliers must be numbers > 0", ["OUT", "LSSA"], False),
    "eval_length lengths 0,64": ("eval_length.py --ckpts=LSSA --lengths=0,64 --out=OUT/ev",
                                 "lengths must be integers > 0", ["OUT", "LSSA"], False),
    "eval_length tokens below the longest length": (
        "eval_length.py --ckpts=LSSA --multipliers=1,2 --tokens=64 --out=OUT/ev",
        "tokens=64 is shorter than the longest length 128, so no window fits; raise --tokens to at least 128",
        ["OUT", "LSSA"], False),
    "eval_length reweight_p abc": ("eval_length.py --ckpts=LSSA --reweight_p=abc --out=OUT/ev",
                                   "reweight_p must be >= 0", ["OUT", "LSSA"], False),
    "eval_length replot missing": ("eval_length.py --replot=OUT/missing.json", "cannot read results", ["OUT"], False),
    "eval_length replot of another kind": ("eval_length.py --replot=OTHER_JSON", "holds no eval_length results",
                                           ["OUT"], False),
    "eval_length sdpa on lssa": ("eval_length.py --ckpts=LSSA --attn_backend=sdpa --lengths=64 --out=OUT/ev",
                                 "attn_backend='sdpa' cannot run attn=lssa", ["OUT", "LSSA"], False),
    "eval_length stride past the shortest length": (
        "eval_length.py --ckpts=LSSA --lengths=64 --stride=128 --out=OUT/ev",
        "stride=128 is longer than the shortest length 64", ["OUT", "LSSA"], False),
    "eval_length negative stride": ("eval_length.py --ckpts=LSSA --lengths=64 --stride=-1 --out=OUT/ev",
                                    "stride=-1 is out of range", ["OUT", "LSSA"], False),  # looped forever
    # sample.py
    "sample prompt file missing": ("sample.py --out_dir=CHAR --start=FILE:OUT/missing.txt",
                                   "cannot read the prompt file", ["OUT", "CHAR"], False),
    "sample BPE offline": ("sample.py --out_dir=BPE --max_new_tokens=2 --num_samples=1",
                           "BPE files for tiktoken", ["BPE"], True),
    # train.py: nothing may be written, not even an empty out_dir
    "train sdpa on lssa": ("TRAIN --data_dir=DATA --out_dir=OUT --attn=lssa --attn_backend=sdpa",
                           "attn_backend='sdpa' cannot run attn=lssa", ["OUT"], False),
    "train a GPU this machine lacks": ("TRAIN --data_dir=DATA --out_dir=OUT --device=NO_GPU", "use --device=",
                                       ["OUT"], False),
    "train unknown attention": ("TRAIN --data_dir=DATA --out_dir=OUT --attn=flash", "unknown attn='flash'", ["OUT"],
                                False),
    "train missing init checkpoint": ("TRAIN --data_dir=DATA --out_dir=OUT --init_from=NOWHERE",
                                      "checkpoint not found", ["OUT"], False),
    "train gate_bias without a gate": ("TRAIN --data_dir=DATA --out_dir=OUT --gate_bias=4",
                                       "no layer of this model has one: add gate=forget", ["OUT"], False),
    "train negative reweight_p": ("TRAIN --data_dir=DATA --out_dir=OUT --reweight_p=-1", "reweight_p must be >= 0",
                                  ["OUT"], False),
    "train float32 bin": ("TRAIN --data_dir=F32 --out_dir=OUT", "the .bin is of another dtype", ["OUT", "F32"], False),
    # degenerate data: one symbol is nothing to learn (every loss 0, every ratio of losses undefined)
    "prepare a text of one symbol": ("data/shakespeare_char/prepare.py --input ONE_CHAR --out_dir OUT/d",
                                     "the text has 1 distinct character(s) ('a')", ["OUT"], False),
    "train on data of one symbol": ("TRAIN --data_dir=ONE_SYMBOL --out_dir=OUT", "has a vocabulary of 1 symbol(s)",
                                    ["OUT", "ONE_SYMBOL"], False),
    # numbers the model cannot turn into probabilities, internal keys, folders that cannot be made
    "sample non-finite probabilities": ("sample.py --out_dir=CHAR --reweight_p=1e300 --max_new_tokens=3 "
                                        "--num_samples=1 --start=abc", "the next-token logits are not finite",
                                        ["CHAR"], False),
    "bench internal mem_case": ("bench.py --mem_case=notjson", "--mem_case is bench.py's own hand-over", ["OUT"],
                                False),
    "eval_length out under /proc": ("eval_length.py --ckpts=LSSA --out=/proc/x/y",
                                    "cannot be created: /proc takes no new folder /proc/x", ["LSSA"], False),
}


def tiny_run(root, meta=None, **kw):
    """make_run's tiny checkpoint in a folder of its own (root/run, its val.bin in root/data), with meta.pkl."""
    root.mkdir()
    d, _ = make_run(root, **kw)
    if meta is not None:
        with open(root / "data" / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)
    return d


@pytest.fixture(scope="module")
def results(char_data, tmp_path_factory):
    """Every case of CASES run at once: {name: (result, folder snapshots before, after)}."""
    tmp = tmp_path_factory.mktemp("bad_input")
    chars = "abcdefghijklmnopqrstuvw"  # make_run's 23 token ids as letters
    paths = {
        "DATA": str(char_data),
        "NO_GPU": f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda",  # plain cuda on a CPU
        "LSSA": tiny_run(tmp / "lssa", n_val=1000, block_size=64),
        "CHAR": tiny_run(tmp / "char", {"vocab_size": 23, "stoi": {c: i for i, c in enumerate(chars)},
                                         "itos": dict(enumerate(chars))}),
        # GPT-2's BPE with its vocabulary padded as train.py pads it
        "BPE": tiny_run(tmp / "bpe", {"vocab_size": 50257, "tokenizer": "gpt2"}, vocab_size=50304),
        "F32": str(tmp / "f32"), "OTHER_JSON": str(tmp / "other.json"), "ONE_CHAR": str(tmp / "one.txt"),
        "ONE_SYMBOL": str(tmp / "one_symbol"),
    }
    (tmp / "one.txt").write_text("a" * 5000)
    (tmp / "one_symbol").mkdir()  # as prepared elsewhere: a vocabulary of one symbol
    for f in ("train.bin", "val.bin"):
        np.zeros(3000, dtype=np.uint16).tofile(tmp / "one_symbol" / f)
    with open(tmp / "one_symbol" / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 1, "stoi": {"a": 0}, "itos": {0: "a"}}, f)
    (tmp / "f32").mkdir()
    for f in ("train.bin", "val.bin"):  # the right tokens, written as float32
        np.fromfile(char_data / f, dtype=np.uint16).astype(np.float32).tofile(tmp / "f32" / f)
    (tmp / "f32" / "meta.pkl").write_bytes((char_data / "meta.pkl").read_bytes())
    (tmp / "other.json").write_text('{"runs": [{"label": "x", "results": [{"length": 64, "accuracy": 1.0}]}]}')

    def one(item):
        i, (name, (cmd, _, watch, offline)) = item
        own = paths | {"OUT": str(tmp / f"out{i}"), "NOWHERE": str(tmp / f"none{i}")}  # nothing shared to write to
        fill = lambda text: re.sub(r"\b[A-Z][A-Z0-9_]+\b", lambda m: own.get(m.group(), m.group()), text)  # noqa: E731
        env = dict(os.environ)
        if offline:  # no cached BPE files, no network
            env |= {k: "http://127.0.0.1:9" for k in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
            env |= {"NO_PROXY": "", "no_proxy": "", "TIKTOKEN_CACHE_DIR": str(tmp / f"no_cache{i}")}
        watch = [fill(w) for w in watch]
        before = {w: snapshot(w) for w in watch}
        args = fill(cmd.replace("TRAIN", " ".join(TRAIN))).split()
        try:
            r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
        except subprocess.TimeoutExpired as e:
            r = subprocess.CompletedProcess(e.cmd, None, "", f"timed out after {e.timeout} s")
        return name, (r, before, {w: snapshot(w) for w in watch})

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(one, enumerate(CASES.items())))


@pytest.mark.parametrize("name", list(CASES))
def test_command_line(results, name):
    r, before, after = results[name]
    assert r.returncode not in (0, None), (r.args, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines and CASES[name][1] in lines[-1], r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert before == after  # no file written, changed or left behind (an absent folder stays absent)


# ----------------------------------------------------------------------------------------------------------------
# In-process: the parsers and the configurator take any text


def one_line_exit(e, prefix):
    msg = e.value.code if hasattr(e, "value") else e.code
    assert isinstance(msg, str) and "\n" not in msg and msg.startswith(prefix), msg
    return msg


LIST_ITEM = st.one_of(st.integers(-3, 10**5), st.floats(allow_nan=True), st.text(alphabet="0123456789.-+e_ ", max_size=5),
                     st.sampled_from(["0", "1", "0.5", "nan", "inf", "", " 2 ", "x", "9" * 400]))
LIST_TEXT = st.one_of(st.text(max_size=30), st.lists(LIST_ITEM, max_size=6).map(lambda xs: ",".join(map(str, xs))))


@PROPERTY
@given(LIST_TEXT, st.sampled_from([int, float]))
def test_parse_numbers_any_text(text, cast):
    try:
        xs = parse_numbers(text, "lengths", cast, prefix="eval error")
    except SystemExit as e:
        one_line_exit(e, "eval error: lengths must be ")
        return
    assert xs and len(set(xs)) == len(xs) and all(type(x) is cast and x > 0 for x in xs)


@PROPERTY
@given(LIST_TEXT)
def test_depths_any_text(text):
    from eval_passkey import parse_depths
    try:
        ds = parse_depths(text)
    except SystemExit as e:
        one_line_exit(e, "passkey error: depths must be fractions in [0, 1]")
        return
    assert ds and len(set(ds)) == len(ds) and all(0 <= d <= 1 for d in ds)


@PROPERTY
@given(LIST_TEXT, st.booleans(), st.integers(1, 4096), st.integers(-5, 5000), st.integers(-5, 300),
       st.integers(0, 5000))
def test_lengths_and_budget_any_input(text, explicit, block_size, tokens, stride, n_val):
    """Lengths from any --lengths / --multipliers text, then a token budget for any --tokens / --stride / data
    size: either usable values (every length >= 1 and distinct; the budget holds a window of the longest length
    and fits the data; the stride skips no token) or one line."""
    try:
        lens = eval_lengths(block_size, **({"lengths": text} if explicit else {"multipliers": text}))
        budget = token_budget(n_val, lens, requested=tokens, stride=stride)
    except SystemExit as e:
        one_line_exit(e, "eval error: ")
        return
    assert lens == sorted(set(lens)) and lens[0] >= 1
    assert max(lens) <= budget <= n_val - 1 and stride <= min(lens) and (not tokens or budget <= tokens)


@PROPERTY
@given(st.text(max_size=30))
def test_name_and_reweight_lists_any_text(text):
    for parse, prefix in ((lambda t: parse_names(t, "ckpts", "eval error"), "eval error: ckpts must be"),
                          (lambda t: parse_reweight_list(t, prefix="eval error"), "eval error: reweight_p must be")):
        try:
            xs = parse(text)
        except SystemExit as e:
            one_line_exit(e, prefix)
            continue
        assert xs and len(set(xs)) == len(xs)


@PROPERTY
@given(st.one_of(st.integers(-10**30, 10**30), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3)))
def test_check_range_any_value(v):
    try:
        check_range({"dropout": v}, 0, 1, open_high=True)
    except SystemExit as e:
        assert one_line_exit(e, "config error: dropout=").endswith("set --dropout to a number in [0, 1)")
        return
    assert 0 <= v < 1 and not isinstance(v, bool)


DEFAULTS = {"batch_size": 12, "learning_rate": 6e-4, "compile": False, "out_dir": "out"}
# values that broke it: an int too large for a float, an int too long to print, nesting deep enough to exhaust
# the parser, a newline in the echoed argument
NASTY = ["1" + "0" * 400, "0x" + "f" * 4000, "9" * 5000, "-" * 100000 + "1", "(" * 100000, "a\nb", "\x00", "1e999",
         "-1e999", "None", "[1, 2]", "{}", "1j", "b'x'", "'quoted'", '"x"', "1_000", "True"]
VALUES = st.one_of(st.text(max_size=20), st.integers().map(str), st.floats().map(str), st.sampled_from(NASTY))


def check_configure(key, value, bare=False):
    """--key=value with any key and text: the value is applied with the default's type, or one line."""
    g = dict(DEFAULTS)
    try:
        configure(g, [f"--{key}" if bare else f"--{key}={value}"])
    except SystemExit as e:
        one_line_exit(e, "config error: ")
        return
    assert key in DEFAULTS and type(g[key]) is type(DEFAULTS[key])
    assert set(g) == set(DEFAULTS) and all(g[k] == DEFAULTS[k] for k in DEFAULTS if k != key)


@PROPERTY
@given(st.one_of(st.sampled_from(list(DEFAULTS)), st.text(max_size=12)), VALUES, st.booleans())
def test_configure_any_key_value(key, value, bare):
    check_configure(key, value, bare)


@pytest.mark.parametrize("value", NASTY, ids=range(len(NASTY)))
def test_configure_nasty_values(value):
    for key in DEFAULTS:
        check_configure(key, value)


@PROPERTY
@given(st.text(max_size=20).filter(lambda a: not a.startswith("--") and not os.path.exists(a)))
def test_configure_any_config_file_name(arg):
    with pytest.raises(SystemExit) as e:
        configure(dict(DEFAULTS), [arg])
    one_line_exit(e, "config error: cannot read config file")


@pytest.mark.parametrize("text,message", [
    ("batch_size = (\n", "line 1: SyntaxError"),
    ("batch_size = 4\nlearning_rate = 1 / 0\n", "line 2: ZeroDivisionError"),
    ("import os\nos.listdir('/no/such/folder')\n", "line 2: FileNotFoundError"),
    ("batch_size = 4.5\n", "batch_size expects int"),
    ("bach_size = 4\n", "unknown key 'bach_size'"),
    ("seed = 2 ** 80\nbatch_size = seed\n", "outside 64 bits"),
])
def test_configure_config_file_errors(tmp_path, text, message):
    path = tmp_path / "cfg.py"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        configure({**DEFAULTS, "seed": 1}, [str(path)])
    assert message in one_line_exit(e, "config error: ")


# ----------------------------------------------------------------------------------------------------------------
# In-process: files that are not what they claim to be


def test_checkpoints_of_other_kinds(tmp_path):
    d, _ = make_run(tmp_path)
    ck = torch.load(os.path.join(d, "ckpt.pt"), weights_only=False)
    nano = dict(ck, model_args={k: ck["model_args"][k] for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                                   "vocab_size")})
    nano["model"] = {"transformer.wpe.weight": torch.zeros(8, 16), **ck["model"]}  # learned positions: not this model
    cases = {"plain.pt": ({"state_dict": {}}, "checkpoint error: .*no model, model_args and config"),
             "alien_args.pt": (dict(ck, model_args={**ck["model_args"], "n_kv_head": 2}), "model_args do not describe"),
             "text.pt": (None, "checkpoint unreadable")}
    for name, (obj, message) in cases.items():
        if obj is None:
            (tmp_path / name).write_text("not a checkpoint\n")
        else:
            torch.save(obj, tmp_path / name)
        with pytest.raises(SystemExit, match=message) as e:
            runs.load_checkpoint(str(tmp_path / name))
        one_line_exit(e, "checkpoint ")
    torch.save(nano, tmp_path / "nano.pt")
    with pytest.raises(SystemExit, match="weights do not fit") as e:
        runs.model_from_checkpoint(runs.load_checkpoint(str(tmp_path / "nano.pt")))
    one_line_exit(e, "checkpoint error: ")
    with pytest.raises(SystemExit, match="unknown attn_backend") as e:
        runs.model_from_checkpoint(ck, attn_backend="cuda-magic")
    one_line_exit(e, "config error: ")


def test_data_files_of_other_kinds(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\x01\x00\x02")  # 3 bytes: not uint16 tokens
    with pytest.raises(SystemExit, match="odd number of bytes") as e:
        dataset.load_split("x", "train", str(tmp_path))
    one_line_exit(e, str(tmp_path))
    for content in (b"not a pickle", pickle.dumps(["a", "list"]), pickle.dumps({"vocab_size": "65"})):
        (tmp_path / "meta.pkl").write_bytes(content)
        with pytest.raises(SystemExit, match="is not a dataset meta.pkl") as e:
            dataset.load_meta("x", str(tmp_path))
        one_line_exit(e, "dataset error: ")


def test_devices_this_machine_lacks():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cases = [(f"cuda:{n}", "use --device="), ("gpu", "unknown device 'gpu'"), ("", "unknown device ''"),
             ("meta", "unknown device 'meta'")]
    if not n:  # a CPU-only torch, or no GPU visible
        cases.append(("cuda", "but this torch " + ("is a CPU-only build" if torch.version.cuda is None else "sees no GPU")))
    if not torch.backends.mps.is_available():
        cases.append(("mps", "MPS is not available"))
    for device, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)) as e:
            options.pick_device(device)
        one_line_exit(e, "config error: ")
