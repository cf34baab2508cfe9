"""Training numerics pinned (tests/pin_numerics.py): every demo attention and family, 8 steps through train.py
from a fixed seed, must give the committed per-step losses within what thread counts and CPUs move. A change that
alters training fails here, naming the runs, and is made on purpose by rewriting the pins
(`python tests/pin_numerics.py`) and regenerating the results it moves."""

import json

from tests import pin_numerics as P


def test_training_losses_match_the_pins():
    with open(P.PIN_FILE) as f:
        pins = json.load(f)
    assert pins["args"] == P.ARGS and pins["runs"] == P.RUNS, "the pinned runs changed: rerun tests/pin_numerics.py"
    runs = dict(P.RUNS, lssar_p14=["--attn=lssar", "--reweight_p=14"])  # a small change, to show the pins see it
    P.RUNS, real = runs, P.RUNS
    try:
        got = P.all_losses(runs)
    finally:
        P.RUNS = real
    moved = {n: max(abs(a - b) for a, b in zip(got[n], pins["losses"][n], strict=True)) for n in real}
    bad = {n: d for n, d in moved.items() if not d <= P.TOLERANCE}
    assert not bad, (f"training numerics moved past {P.TOLERANCE:g} for {bad}: if on purpose, run "
                     "`python tests/pin_numerics.py` and regenerate the committed results")
    assert max(abs(a - b) for a, b in zip(got["lssar_p14"], pins["losses"]["lssar"], strict=True)) > 20 * P.TOLERANCE
