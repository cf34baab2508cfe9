"""The GPU program of the Triton kernels, read on the CPU (kernels/sass.py): every config the launchers can
choose compiles for sm_80 and sm_90 without a register spill, within the per-block shared memory, and with wgmma
(HGMMA) for every 16-bit dot on sm_90; the checker itself catches each of those; the kernels' elementwise softplus
and sigmoid (one exp2 and FMAs) are accurate to the stated bounds over the float32 range; the stick-breaking kernels'
conversions (PTX on a GPU) round as torch does, two values per instruction."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

try:  # (conftest.py set TRITON_INTERPRET=1 on a CPU before anything imported triton)
    import triton
    import triton.language as tl

    from kernels import triton_attn as ta
except ImportError:  # no triton here: conftest.py deselects this file's tests, marked `triton`
    ta = None
pytestmark = pytest.mark.triton


def sass(*args, timeout=900):
    """python -m kernels.sass in a process of its own: the kernels must be compiled, not interpreted."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, "-m", "kernels.sass", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.triton_cuda
def test_every_launcher_config_compiles_cleanly_for_sm80_and_sm90():
    """The CI gate on the GPU code: `--mode=check --subset=ci` compiles a representative subset of the launchers'
    configs (kernels.sass.ci_configs, 56 kernels: every entry of the tile tables TILES and TILES_EXCEPT, an sm_80
    entry on sm_80; every (kind, pass) of the score kinds plain and with each of the forget gate, ALiBi and a window,
    and with all three together with and without the re-weighting; stick-breaking's kinds and passes; fp32 and bf16
    dots, head sizes 64 and 128 as the entries ask) and fails on a spill, too much shared memory, or a 16-bit sm_90
    kernel without wgmma. The full matrix (every combination of pass, kind, p, dtype incl. fp16, head size, gate,
    ALiBi, window, architecture) is `python -m kernels.sass --mode=check`: results/bench/sass_check.md."""
    from kernels.sass import ci_configs
    n = len(ci_configs())
    r = sass("--mode=check", "--subset=ci")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " 0 failed" in r.stdout and f"checked {n} kernels" in r.stdout, r.stdout[-2000:]


def test_the_ci_subset_covers_every_tile_entry_and_kernel_kind():
    """ci_configs covers every TILES / TILES_EXCEPT entry (each through a config that resolves to it) and every
    kernel kind, ALiBi and windows included, on sm_90; an sm_80-only entry on sm_80."""
    from kernels.sass import ci_configs, tile_entry
    cfgs = ci_configs()
    entries = {tile_entry(c) for c in cfgs}
    assert entries == set(ta.TILES) | set(ta.TILES_EXCEPT)  # (an "sm_80" entry resolves on sm_80 only)
    for kind in ta.KINDS:
        for pass_ in ("fwd", "dq", "dkdv"):
            assert any(c["kind"] == kind and c["pass_"] == pass_ and c["arch"] == 90 for c in cfgs), (kind, pass_)
    for feature in ("gate", "alibi", "window"):
        assert {(c["kind"], c["pass_"]) for c in cfgs if c[feature]} >= {(k, p) for k in ("softplus", "exp")
                                                                           for p in ("fwd", "dq", "dkdv")}


def _brute_tiles(pass_, kind, T, bm, bn, W):
    """(tiles holding a score the kernel must touch, tiles in which every score is one it computes), by looking at
    every (query, key) pair: causal, under a window P - W < j <= P; stick-breaking touches the keys j <= P (its own
    key for the remainder) and computes with j < P (j <= P with the row's own key in the stick)."""
    def touched(i, j):
        return j <= i and (not W or j > i - W)

    def computed(i, j):
        return j < i if kind == "stickbreak" else touched(i, j)
    need = full = 0
    outer, inner = (bm, bn) if pass_ != "dkdv" else (bn, bm)
    for a in range(0, T, outer):
        for b in range(0, T, inner):
            qs, ks = (range(a, min(a + outer, T)), range(b, min(b + inner, T)))
            if pass_ == "dkdv":
                qs, ks = ks, qs
            need += any(touched(i, j) for i in qs for j in ks)
            full += all(computed(i, j) for i in qs for j in ks)
    return need, full


def test_the_report_counts_exactly_the_tiles_the_kernels_need():
    """kernels.sass.tiles_of (the loop bounds of the launchers' kernels, written out for the report's work count):
    every kernel visits exactly the tiles that hold a score it must touch, masked or not, and never skips the mask
    where a score of the tile is outside the row's keys; windows of 1 to 70 keys, tiles of several shapes."""
    from kernels.sass import tiles_of
    for kind, windows in (("softplus", (0, 1, 5, 16, 33, 70)), ("stickbreak", (0,)), ("stickbreak_self", (0,))):
        for W in windows:
            for T in (1, 17, 40, 130):
                for bm, bn in ((16, 16), (32, 16), (16, 32), (64, 32), (32, 64)):
                    for pass_ in ("fwd", "dq", "dkdv"):
                        masked, unmasked, _ = tiles_of(pass_, kind, T, bm, bn, W)
                        need, full = _brute_tiles(pass_, kind, T, bm, bn, W)
                        assert masked + unmasked == need and unmasked <= full, (pass_, kind, T, bm, bn, W)


@pytest.mark.triton_cuda
def test_the_checker_catches_spills_and_missing_wgmma(tmp_path):
    """One real compile with a tile that spills (fp32 dq, head size 128, 64 x 32 rows x keys, 8 warps) and one
    16-bit sm_90 kernel forced onto 32-row tiles (mma.sync, not wgmma): `problems` names both."""
    code = """
import json, sys
from kernels import sass as S, triton_attn as K
bad = {"dq": (64, 32, 8, 2), "fwd": (32, 32, 4, 2)}
real = K._config  # the dq pass also asks for the dk/dv tile: that one stays the launcher's
K._config = lambda kernel, *args: bad[kernel] if kernel in bad else real(kernel, *args)
rows = [S.analyse(dict(arch=90, pass_="dq", kind="softplus", p=15.0, dtype="fp32", D=128, T=4096, gate=False)),
        S.analyse(dict(arch=90, pass_="fwd", kind="exp", p=0.0, dtype="bf16", D=64, T=4096, gate=False))]
print(json.dumps([S.problems(r) for r in rows]))
"""
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    spill, wgmma = json.loads(r.stdout.strip().splitlines()[-1])
    assert any("register spill" in p for p in spill), spill
    assert any("not all on wgmma" in p for p in wgmma), wgmma


def test_problems_names_each_defect():
    from kernels.sass import SMEM_LIMIT, problems
    ok = dict(arch=90, dtype="bf16", local=0, spill_ops=0, shared=64 * 1024, hmma=0, hgmma=12, regs=128)
    assert problems(ok) == []
    assert "register spill" in problems(ok | {"spill_ops": 3})[0]
    assert "shared memory" in problems(ok | {"shared": SMEM_LIMIT[90] + 1})[0]
    assert "wgmma" in problems(ok | {"hmma": 16})[0]
    assert "wgmma" in problems(ok | {"hgmma": 0})[0]
    assert problems(ok | {"arch": 80, "hgmma": 0, "hmma": 16}) == []  # sm_80 has no wgmma
    assert problems(ok | {"dtype": "fp32", "hgmma": 0, "hmma": 16}) == []  # fp32 dots: tf32x3, any instruction


def test_tensor_core_flops_of_an_instruction():
    from kernels.sass import tensor_flops
    assert tensor_flops("HGMMA.64x64x16.F32.BF16", 8) == (2 * 64 * 64 * 16 * 2, False)  # 2 warpgroups
    assert tensor_flops("HMMA.16816.F32.BF16", 4) == (2 * 16 * 8 * 16 * 4, False)
    assert tensor_flops("HMMA.1688.F32.TF32", 4) == (2 * 16 * 8 * 8 * 4, True)
    assert tensor_flops("FFMA", 4) == (0.0, False)


# the bounds docs/backends.md and kernels/triton_attn.py state (measured over every float32 input of the binades that
# matter: python -m kernels.sass --mode=accuracy); here every 1024th bit pattern of them (0.8M inputs) and the edges
BOUNDS = {False: (4e-7, 6e-7), True: (6e-5, 6e-5)}  # fast polynomials: (softplus, sigmoid)


@pytest.mark.parametrize("fast", [False, True], ids=["fp32-dots", "16-bit-dots"])
def test_softplus_and_sigmoid_accuracy(fast):
    from kernels.sass import accuracy_of, float32_binades
    x = np.concatenate([*float32_binades(step=1024),
                        np.array([0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 30.0, -30.0, 126.0, -125.0, 1e30, -1e30],
                                 np.float32)])
    ew, edw = accuracy_of(x, fast)
    assert ew <= BOUNDS[fast][0] and edw <= BOUNDS[fast][1], (ew, edw)
    # and not trivially: a polynomial with a wrong coefficient is far outside the bound
    saved = ta.POLY["L4" if fast else "L7"]
    try:
        ta.POLY["L4" if fast else "L7"] = (saved[0] * (1 + 1e-4),) + saved[1:]
        assert accuracy_of(x, fast)[0] > BOUNDS[fast][0]
    finally:
        ta.POLY["L4" if fast else "L7"] = saved


def test_kernel_softplus_matches_the_numpy_model():
    """The kernels' own elementwise functions (tl.exp2, the polynomials; through the interpreter on a CPU, compiled
    on a GPU) equal kernels.sass's numpy model of them to a few float32 ulp (the model fuses multiply-adds, the
    interpreter does not; a GPU's exp2 is approximate)."""
    import torch

    from kernels.sass import kernel_softplus_sigmoid
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.linspace(-40.0, 40.0, 4096, dtype=torch.float32, device=dev)
    for fast in (False, True):
        w, dw = torch.empty_like(x), torch.empty_like(x)
        _probe[(1,)](x, w, dw, FAST=fast, N=4096)
        mw, mdw = kernel_softplus_sigmoid(x.cpu().numpy(), fast)
        tol = 4e-7 if dev == "cpu" else 2e-6
        np.testing.assert_allclose(w.cpu().numpy(), mw, rtol=tol, atol=0)
        np.testing.assert_allclose(dw.cpu().numpy(), mdw, rtol=tol, atol=1e-30)


CONVERSIONS = """
import triton
import triton.language as tl
from kernels import triton_attn as ta


@triton.jit
def conversions(X, SAT, RH, RB, N: tl.constexpr):
    # the stick-breaking kernels' conversions of N values
    i = tl.arange(0, N)
    x = tl.load(X + i)
    tl.store(SAT + i, ta._f16_sat(x))
    tl.store(RH + i, ta._rounded(x, tl.float16))
    tl.store(RB + i, ta._rounded(x, tl.bfloat16))
"""


def _conversions(tmp_path):
    """The module above, written to tmp_path (Triton needs a kernel's source file; and a compiling process of its
    own must import it without tests/conftest.py, which turns the interpreter on)."""
    import importlib.util
    path = tmp_path / "stick_conversions.py"
    path.write_text(CONVERSIONS)
    spec = importlib.util.spec_from_file_location("stick_conversions", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.conversions


def test_the_stick_conversions_round_as_torch_does(tmp_path):
    """triton_attn._f16_sat and _rounded, the stick-breaking kernels' conversions (PTX on a GPU, two values per
    instruction; Triton's own ops under the interpreter): fp16 saturated at 65504 instead of inf, and fp32 rounded to
    fp16 or bf16 to nearest even and back, as torch rounds (bf16 on a GPU only: the interpreter truncates to bf16).
    Inputs: ties to even for bf16 (1 + 2^-8, 1 + 3 2^-8) and fp16 (1 + 2^-11, 1 + 3 2^-11), fp16's largest value and
    past it, inf, tiny values, random ones."""
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    edges = [0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.0, 65520.0, 1e7,
             float("inf"), 2.0**-20, 1e-30]
    x = torch.cat([torch.tensor(edges), 100 * torch.randn(256 - len(edges), generator=torch.Generator().manual_seed(0))])
    x = x.float().to(dev)
    sat, rh, rb = torch.empty_like(x, dtype=torch.float16), torch.empty_like(x), torch.empty_like(x)
    _conversions(tmp_path)[(1,)](x, sat, rh, rb, N=x.numel())
    pos = x >= 0  # (the kernels saturate softplus, >= 0)
    assert torch.equal(sat[pos], x[pos].clamp(max=65504.0).half())
    assert torch.equal(rh, x.half().float())
    if dev == "cuda":
        assert torch.equal(rb, x.bfloat16().float())


@pytest.mark.triton_cuda
def test_the_stick_conversions_take_one_instruction_per_two_values(tmp_path):
    """Compiled for sm_80 and sm_90, _f16_sat is one saturating F2FP per two values (no separate min) and _rounded one
    F2FP per two values and integer unpacking (no F2F, a conversion per value)."""
    (tmp_path / "stick_conversions.py").write_text(CONVERSIONS)
    code = """
import json, torch
from kernels import sass as S
from stick_conversions import conversions
x = torch.empty(256, device="meta")
out = {}
for arch in (80, 90):
    launch = ("conv", conversions, (1,), (x, x.half(), x, x), dict(N=256, num_warps=1, num_stages=1))
    ins, _, _ = S.disassemble(S.compile_launch(launch, arch)[0])
    out[arch] = [op for op, _ in ins if op.startswith(("F2F", "FMNMX", "HADD2.F32"))]
print(json.dumps(out))
"""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for arch, ops in json.loads(r.stdout.strip().splitlines()[-1]).items():
        # 32 threads, 8 values each: 4 saturating packs, 4 + 4 packs for fp16 and bf16, 8 fp16 -> fp32 unpacks
        assert all(o.startswith("F2FP") or o == "HADD2.F32" for o in ops), (arch, ops)
        assert sum(o.startswith("F2FP.SATFINITE") for o in ops) == 4 and ops.count("HADD2.F32") == 8, (arch, ops)
        assert sum(o.startswith("F2FP") for o in ops) == 12, (arch, ops)


if ta is not None:
    @triton.jit
    def _probe(X, W, DW, FAST: tl.constexpr, N: tl.constexpr):
        # the kernels' softplus and sigmoid (base 2) of N scores, written out
        i = tl.arange(0, N)
        x = tl.load(X + i)
        w, dw = ta._weights_slope(x, x, False, FAST)
        tl.store(W + i, w)
        tl.store(DW + i, dw)
