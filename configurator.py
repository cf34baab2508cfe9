"""
nanoGPT-style configuration. A script keeps its defaults as module-level variables and calls

    config = configure(globals())

which applies, in order, config files (`python train.py config/x.py`) and `--key=value` overrides to those
variables, and returns the resulting {key: value} dict (saved into checkpoints). Only keys that already
exist as int / float / bool / str defaults can be set, and a value must have the default's type
(an int is accepted for a float); anything else is a one-line error naming the fix. configure(g, given=set())
also collects the keys that a config file or an override set (train.py's resume compares those).
script_defaults(path) reads a script's defaults without running it, for a dry parse of its arguments.
"""

import difflib
import sys
from ast import literal_eval

SIMPLE = (int, float, bool, str)


def config_keys(g):
    """The settable keys of a script's namespace: its lower-case module-level ints, floats, bools and strings
    (CAPITALISED names are constants, such as ROOT or MAX_NEW_TOKENS, and imports are not settings)."""
    return [k for k, v in g.items() if not k.startswith("_") and k.islower() and isinstance(v, SIMPLE)]


def _check(key, value, default, where):
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        # --seed=0xfff... (any length): no key needs more, and printing it could exceed Python's int-to-str limit
        raise SystemExit(f"config error: {key} got an integer outside 64 bits from {where}; use a smaller number")
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = type(value) is type(default)
    if not ok:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:60] + "..."
        raise SystemExit(f"config error: {key} expects {type(default).__name__} (default {default!r}), "
                         f"got {shown} from {where if len(where) <= 80 else where[:60] + '...'}")
    return value


def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(keys))}"
    return SystemExit(f"config error: unknown key {key!r} from {where}{hint}")


class _Assigned(dict):
    """A config file's namespace that remembers which names the file assigned (star imports included)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.assigned = set()

    def __setitem__(self, k, v):
        self.assigned.add(k)
        super().__setitem__(k, v)


def script_defaults(path):
    """The defaults of a script laid out like train.py: the plain assignments between its first two
    `# -----` lines, executed on their own (no imports, nothing run)."""
    with open(path) as f:
        src = f.read()
    marks = [i for i, line in enumerate(src.splitlines()) if line.startswith("# ----")]
    ns = {}
    exec("\n".join(src.splitlines()[marks[0] + 1:marks[1]]), ns)
    return {k: v for k, v in ns.items() if not k.startswith("_") and k.islower() and isinstance(v, SIMPLE)}


def configure(g, argv=None, given=None):
    argv = sys.argv[1:] if argv is None else argv
    given = set() if given is None else given
    keys = config_keys(g)
    for arg in argv:
        if not arg.startswith("--"):  # a config file: plain python that assigns some of the keys
            try:
                with open(arg) as f:
                    src = f.read()
            except (OSError, ValueError) as e:  # missing, a folder, not text, a NUL in the name
                why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
                raise SystemExit(f"config error: cannot read config file {arg!r} ({why}); "
                                 "pass an existing file such as config/train_shakespeare_char.py") from None
            print(f"Overriding config with {arg}")
            ns = _Assigned({k: g[k] for k in keys})
            try:
                exec(compile(src, arg, "exec"), ns)
            except Exception as e:  # noqa: BLE001 - the user's file failed, not this code: say where, in one line
                line = e.lineno if isinstance(e, SyntaxError) else None
                tb = e.__traceback__
                while tb is not None:  # the last frame of the file itself (it may have called into other code)
                    line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == arg else line
                    tb = tb.tb_next
                raise SystemExit(f"config error: config file {arg!r} line {line}: {type(e).__name__}: "
                                 f"{' '.join(str(e).split())}; fix the file (it is plain Python assigning keys)") from None
            for k, v in ns.items():
                if k.startswith("_") or not isinstance(v, SIMPLE):
                    continue  # modules, helpers, __builtins__
                if k not in keys:
                    raise _unknown(k, keys, arg)
                g[k] = _check(k, v, g[k], arg)
                if k in ns.assigned:
                    given.add(k)
        else:
            if "=" not in arg and isinstance(g.get(arg[2:]), bool):
                arg += "=True"  # a bare --flag switches a boolean key on
            if "=" not in arg:
                raise SystemExit(f"config error: write overrides as --key=value, got {arg!r}")
            key, val = arg[2:].split("=", 1)
            if key not in keys:
                raise _unknown(key, keys, repr(arg))
            if isinstance(g[key], str):  # a str key takes the text as it is: --out_dir=123, --device=cpu
                if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
                    val = val[1:-1]  # --out_dir='out' as written for nanoGPT
            else:
                try:
                    val = literal_eval(val)  # numbers, booleans
                except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
                    pass  # left as text: _check reports the wrong type
            g[key] = _check(key, val, g[key], repr(arg))
            given.add(key)
            print(f"Overriding: {key} = {g[key]!r}")
    return {k: g[k] for k in keys}
