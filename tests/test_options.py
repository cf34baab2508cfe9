"""Every script's options, fed random text: each script's parser and its option checks (the function each script
calls before it reads a checkpoint or writes a file) either accept the options or stop with one line naming the fix
(SystemExit with a one-line message: exit code 1), never a traceback, and never leave a file behind."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bench
import diagnose
import eval_length
import eval_passkey
import eval_retrieval
import sample
import sweep
from configurator import config_keys, configure, script_defaults
from conftest import ROOT
from options import check_train_options

# paths a random option may name: relative ones land in the test's empty folder (checked to stay empty)
PATHS = ["out/x", "", ".", "res/a/b", "/proc/x/y", "/dev/null/x", "f.json", "a,b", "[x]"]
TEXT = st.one_of(
    st.text(alphabet="0123456789.,-+e_xyzTruefalsenoaic:*=[]{}@ /", max_size=24),
    st.sampled_from(["0", "1", "-1", "1e300", "nan", "inf", "-inf", "True", "False", "auto", "ckpt", "none", "logn",
                     "irope", "1,2,4", "1,,2", "1,0", "64,32", "softmax", "lssar:pos=none", "[3*softmax:window=4,lssar]",
                     "softmax@32=2", "cuda", "cpu", "fp32", "retrieval", "9" * 30]),
    st.integers(-5, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr))


def module_keys(mod):
    return {k: v for k, v in vars(mod).items() if k in config_keys(vars(mod))}


def check_module(mod, check):
    """check(o) for a script whose option functions read the configured dict o."""
    def run(argv):
        check(configure(dict(module_keys(mod)), argv))
    return run


def check_globals(mod, check):
    """check() for a script whose option functions read its module's globals (sweep, bench): set, then restored."""
    def run(argv):
        saved = module_keys(mod)
        try:
            configure(vars(mod), argv)
            check()
        finally:
            vars(mod).update(saved)
    return run


def bench_check():
    bench.check_numbers()
    for key, allowed in (("kinds", bench.bench_kinds()), ("backends", bench.BACKENDS)):
        bad = [x for x in bench.parse_list(vars(bench)[key]) if x not in allowed]
        if bad:
            raise SystemExit(f"bench error: unknown {key} {', '.join(bad)}")


SCRIPTS = {
    "train": lambda argv: check_train_options(configure(script_defaults(os.path.join(ROOT, "train.py")), argv)),
    "sample": check_module(sample, sample.check_options),
    "eval_length": check_module(eval_length, eval_length.check_options),
    "eval_passkey": check_module(eval_passkey, eval_passkey.check_options),
    "eval_retrieval": check_module(eval_retrieval, eval_retrieval.check_options),
    "diagnose": check_module(diagnose, diagnose.check_options),
    "sweep": check_globals(sweep, sweep.check_options),
    "bench": check_globals(bench, bench_check),
}
KEYS = {"train": list(script_defaults(os.path.join(ROOT, "train.py"))), "sample": list(module_keys(sample)),
        "eval_length": list(module_keys(eval_length)), "eval_passkey": list(module_keys(eval_passkey)),
        "eval_retrieval": list(module_keys(eval_retrieval)), "diagnose": list(module_keys(diagnose)),
        "sweep": list(module_keys(sweep)), "bench": list(module_keys(bench))}
PATH_KEYS = {"out", "out_dir", "results", "out_root", "data_dir", "replot", "ckpts", "compare", "precision_ckpt",
             "config", "input", "init_from"}
NEVER = {"mem_case", "precision", "compare", "replot"}  # the modes that would do work (covered by their own tests)


def argv_for(script):
    keys = [k for k in KEYS[script] if k not in NEVER]

    def item(key, value, path):
        return f"--{key}={path if key in PATH_KEYS else value}"
    one = st.tuples(st.sampled_from(keys + ["nosuchkey", "n_layr"]), TEXT, st.sampled_from(PATHS)).map(
        lambda t: item(*t))
    return st.lists(one, max_size=5)


@pytest.mark.parametrize("script", list(SCRIPTS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_options_parse_or_stop_in_one_line(script, data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = data.draw(argv_for(script))
    before = sorted(os.listdir(tmp_path))
    try:
        SCRIPTS[script](argv)
    except SystemExit as e:
        assert isinstance(e.code, str) and e.code and "\n" not in e.code, (argv, e.code)
    assert sorted(os.listdir(tmp_path)) == before, argv  # nothing written, not even an empty folder
    capsys.readouterr()
