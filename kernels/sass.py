"""
What the Triton kernels will cost on a GPU, read from the compiled GPU program on any machine (no GPU needed):
every launch `triton_attn.launches` can make is compiled for sm_80 (A100) and sm_90 (H100 / H200) with the ptxas
in Triton's wheel, disassembled with its nvdisasm, and counted.

    python -m kernels.sass                    # the report: results/bench/sass.{json,md} (a few minutes on 2 cores)
    python -m kernels.sass --mode=check       # every config: no register spill, shared memory within the
                                              # device's per-block limit, wgmma for 16-bit dots on sm_90
    python -m kernels.sass --mode=accuracy    # the kernels' softplus and sigmoid against float64 over every
                                              # float32 input: results/bench/softplus_accuracy.json (~10 min)
    python -m kernels.sass --mode=fit         # refit the polynomials of triton_attn.POLY (prints them)
(`python bench.py --compare=results/bench/bench_cuda_attn.json` puts a GPU run's measured time ratios next to
these estimates.)

Counts (per kernel): registers, spills (local memory), shared memory; instructions of the steady-state key loop
(the unmasked sweep(s); LSSAR's forward has two, both counted) by class, per score element = instructions x
threads per program / scores per loop iteration. The cycle estimate of one tile is the slowest of: instruction
issue, each execution pipe and the tensor cores, from the published per-SM throughputs in PIPES; it ignores
memory, latency and occupancy, so it is an ESTIMATE FROM THE COMPILED CODE, NOT A MEASUREMENT, and is given as
a ratio to the exp kernel (softmax, p = 0: FlashAttention's work) of the same pass, architecture, dtype and head
size. Work done in PyTorch around the kernels is listed with it (OUTSIDE).

Runs in its own process with TRITON_INTERPRET=0 (the kernels must be compiled, not interpreted).
"""

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

ARCHS = (80, 90)
# the largest shared memory one block may use (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability": 163 KB on 8.0, 227 KB on 9.0)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Per-SM throughput per clock. Issue: 4 schedulers x 1 warp instruction. Lanes per clock (CUDA C++ Programming
# Guide, "Arithmetic Instructions" throughput table): fp32 add/mul/fma 64 (8.0) / 128 (9.0); compare, min/max,
# integer and logic 64; MUFU (exp2, log2, rcp, ...) 16; type conversions 16. Tensor cores, dense FLOP per clock per SM
# from the A100 and H100 SXM5 datasheets (312 TFLOPS bf16 / 156 TF32 on 108 SMs at 1.41 GHz; 989 / 495 on 132 SMs
# at 1.83 GHz). On sm_90 the pre-Hopper mma.sync (HMMA) reaches about 2/3 of wgmma's peak (FlashAttention-3,
# Shah et al. 2024, section 2.2).
PIPES = {
    80: dict(issue=4, fma=64, alu=64, mufu=16, cvt=16, tc16=2048, tc32=1024, hmma=1.0),
    90: dict(issue=4, fma=128, alu=64, mufu=16, cvt=16, tc16=4096, tc32=2048, hmma=2 / 3),
}
OUTSIDE = {"fwd": "q x log2(e) and the cast to the dots' dtype (PyTorch, O(T d) per call)",
           "dq": "delta = rowsum(dout * out) (PyTorch, O(T d) per call)", "dkdv": "none (reads delta and m_t)"}
# steady-state loops in source order: forward p = 0 [unmasked, diagonal], p > 0 [sweep 1 unmasked, diagonal, sweep 2
# unmasked, diagonal]; dq [unmasked, diagonal]; dk/dv [diagonal, unmasked]
LOOPS = {("fwd", False): (2, [0]), ("fwd", True): (4, [0, 2]), ("dq", False): (2, [0]), ("dq", True): (2, [0]),
         ("dkdv", False): (2, [1]), ("dkdv", True): (2, [1])}
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "fp16": (torch.float16, torch.float16)}

# -----------------------------------------------------------------------------
mode = "report"          # report | check | accuracy | fit
heads = "64,128"         # head sizes
dtypes = "fp32,bf16,fp16"  # q.k dots' dtype (v the same)
ps = "0,15"              # re-weighting powers
kinds = "softplus,exp"
archs = "80,90"
T = 4096                 # the sequence length the launchers pick tiles for (and 16: decoding tiles, in check)
workers = 0              # compile processes; 0 = one per CPU
out = "results/bench/sass"
# -----------------------------------------------------------------------------


def _bin(tool):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def configs(Tq, heads_, dtypes_, ps_, kinds_, archs_, gates_=(False, True)):
    """Every (arch, pass, kind, p, dtype, head size, forget gate) to compile (at sequence length Tq: the tiles do
    not depend on it)."""
    return [dict(arch=a, pass_=ps_name, kind=k, p=p, dtype=dt, D=D, T=Tq, gate=g) for a in archs_ for g in gates_
            for k in kinds_ for p in ps_ for dt in dtypes_ for D in heads_ for ps_name in ("fwd", "dq", "dkdv")]


def launch_of(cfg):
    """The launch triton_attn makes for this config (meta tensors: shapes, dtypes and alignment are all it needs)."""
    from kernels import triton_attn as K
    qd, vd = DTYPES[cfg["dtype"]]
    q = torch.empty(1, 12, cfg["T"], cfg["D"], dtype=qd, device="meta")
    v = torch.empty(1, 12, cfg["T"], cfg["D"], dtype=vd, device="meta")
    c = torch.empty(1, 12, cfg["T"], dtype=torch.float32, device="meta") if cfg.get("gate") else None
    ls = K.launches(q, q, v, 0, float(cfg["p"]), cfg["kind"], 3, backward=cfg["pass_"] != "fwd" or None, c=c,
                    arch=cfg["arch"])
    return {launch[0]: launch for launch in ls}[cfg["pass_"]]


def compile_launch(launch, arch):
    """(cubin bytes, shared memory bytes) of a launch compiled for sm_<arch>, through the same specialization
    (argument alignment, constants) as the JIT's own launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError:  # triton 3.2 (see below)
        create_function_from_signature = None

    _, kernel, _, args, meta = launch
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    if hasattr(kernel, "_pack_args"):  # triton >= 3.3: the JIT's own binder and argument packing
        bound, spec, opts = create_function_from_signature(kernel.signature, kernel.params, backend)(*args, **meta)
        options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, spec, opts)
        src = ASTSource(kernel, signature, constexprs, attrs)
    else:  # triton 3.2: what its JITFunction.run does before compiling
        kernel.create_binder(backend)
        bound, sig_and_spec, _, _, _ = kernel.binder(*args, **meta)
        options, vals = backend.parse_options(meta), tuple(bound.values())
        keys = [kernel.params[i].name for i in kernel.non_constexpr_indices]
        signature = {k: "*i8" if v == "none" else v for k, v in zip(keys, sig_and_spec[:len(keys)], strict=False)}
        attrs = backend.get_attrs_descriptor(kernel.params, vals)
        special = attrs.get_constants()
        constants = {p.name: v for v, p in zip(vals, kernel.params, strict=True)
                     if p.is_constexpr or p.num in special or v is None}
        src = ASTSource(kernel, signature, constants, attrs)
    ck = triton.compile(src, target=target, options=options.__dict__)
    return ck.asm["cubin"], ck.metadata.shared


def disassemble(cubin):
    """(instructions [(opcode, operands)], labels {name: index}, resources {REG, STACK, LOCAL, SHARED})."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_bin("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ins, labels = [], {}
    for line in text.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)(.*?);", line)
        if m:
            ins.append((m.group(1), m.group(2)))
    resources = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", res.split("Function")[-1])}
    return ins, labels, resources


def loops(ins, labels):
    """[(first, end)] of every loop (a branch back to an earlier label) of more than a few instructions."""
    found = []
    for i, (op, rest) in enumerate(ins):
        m = re.search(r"\((\.L_x_\d+)\)", rest) if op.startswith("BRA") else None
        if m and labels.get(m.group(1), i + 1) <= i and i + 1 - labels[m.group(1)] > 8:
            found.append((labels[m.group(1)], i + 1))
    return sorted(found)


def op_class(op):
    """The execution resource an instruction uses."""
    base = op.split(".")[0]
    if base == "MUFU":
        return op  # MUFU.EX2, MUFU.RCP, MUFU.LG2, ...
    if base in ("HGMMA", "HMMA"):
        return base
    if base in ("FFMA", "FADD", "FMUL"):
        return "fp32 fma pipe"
    if base in ("FMNMX", "FSEL", "FSETP", "FMNMX3"):
        return "fp32 compare/select"
    if base in ("F2FP", "F2F", "I2F", "F2I", "I2FP", "F2IP"):
        return "conversion"
    if base in ("LDG", "LDS", "LDSM", "STS", "STG", "LDGSTS", "LDL", "STL", "UTMALDG", "LDGDEPBAR", "DEPBAR",
                "SYNCS", "BAR", "MEMBAR", "FENCE", "ARRIVES"):
        return "memory/sync"
    if base.startswith("U") or base in ("WARPGROUP", "WARPSYNC", "NOP", "BRA", "EXIT", "S2R", "S2UR", "CS2R"):
        return "uniform/control"
    return "integer/other"


def tensor_flops(op, warps):
    """FLOPs per program of one tensor-core instruction in every warp: HGMMA.64xNxK (one per warpgroup of 4
    warps) or HMMA.MNK (m16n8k8 = 1688, m16n8k16 = 16816, per warp); and whether it is a 32-bit (tf32) op."""
    tf32 = ".TF32" in op
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        a, b, c = map(int, m.groups())
        return 2 * a * b * c * warps / 4, tf32
    m = re.match(r"HMMA\.(16)(8)(8|16)", op)
    if m:
        a, b, c = map(int, m.groups())
        return 2 * a * b * c * warps, tf32
    return 0.0, tf32


def analyse(cfg):
    """Compile one config and count it (a worker's job)."""
    from kernels import triton_attn as K
    fast = K.constants(cfg["p"], cfg["kind"], 3, DTYPES[cfg["dtype"]][0])["FAST"]
    return measure(launch_of(cfg), dict(cfg, fast_poly=fast))


def measure(launch, cfg):
    """The counts of one launch (see the module docstring) compiled for sm_<cfg['arch']>, into a copy of cfg (which
    also needs 'p': the loop structure depends on the re-weighting)."""
    name, _, _, _, meta = launch
    warps, bm, bn = meta["num_warps"], meta["BLOCK_M"], meta["BLOCK_N"]
    t0 = time.time()
    cubin, shared = compile_launch(launch, cfg["arch"])
    ins, labels, res = disassemble(cubin)
    found = loops(ins, labels)
    want, steady = LOOPS[(name, cfg["p"] > 0)]
    row = dict(cfg, tile=[bm, bn, warps, meta["num_stages"]], regs=res.get("REG", 0), local=res.get("LOCAL", 0),
               stack=res.get("STACK", 0), spill_ops=sum(op.startswith(("STL", "LDL")) for op, _ in ins),
               shared=shared + res.get("SHARED", 0), instructions=len(ins), loops=[b - a for a, b in found],
               hmma=sum(op.startswith("HMMA") for op, _ in ins), hgmma=sum(op.startswith("HGMMA") for op, _ in ins),
               compile_s=round(time.time() - t0, 2))
    if len(found) != want:
        row["error"] = f"found {len(found)} loops in the compiled code, expected {want}"
        return row
    counts, tensor_ops, flops32, flops16 = {}, {}, 0.0, 0.0
    threads, scores = 32 * warps, bm * bn
    hmma_rate = PIPES[cfg["arch"]]["hmma"]
    for i in steady:
        a, b = found[i]
        for op, _ in ins[a:b]:
            c = op_class(op)
            counts[c] = counts.get(c, 0) + 1
            f, tf32 = tensor_flops(op, warps)
            if f:
                tensor_ops[op] = tensor_ops.get(op, 0) + 1
                f = f / (hmma_rate if op.startswith("HMMA") else 1.0)  # slower pipe: more effective FLOPs
                flops32, flops16 = (flops32 + f, flops16) if tf32 else (flops32, flops16 + f)
    pipe = PIPES[cfg["arch"]]
    n_all = sum(counts.values())
    lanes = lambda *cls: sum(v for k, v in counts.items() if k in cls or any(k.startswith(c) for c in cls)) * threads
    cycles = {"issue": n_all * warps / pipe["issue"], "fma": lanes("fp32 fma pipe") / pipe["fma"],
              "alu": lanes("fp32 compare/select", "integer/other") / pipe["alu"], "mufu": lanes("MUFU") / pipe["mufu"],
              "cvt": lanes("conversion") / pipe["cvt"], "tensor": flops16 / pipe["tc16"] + flops32 / pipe["tc32"]}
    bound = max(cycles, key=cycles.get)
    row.update(per_score={k: round(v * threads / scores, 3) for k, v in sorted(counts.items())},
               per_score_all=round(n_all * threads / scores, 3), tensor_ops=tensor_ops,
               cycles={k: round(v, 1) for k, v in cycles.items()}, estimate=round(cycles[bound], 1), bound=bound,
               estimate_per_score=round(cycles[bound] / scores, 5), outside=OUTSIDE[name])
    return row


def problems(r):
    """Why a compiled config is not acceptable: a spill, shared memory over the per-block limit, a 16-bit kernel
    on sm_90 without wgmma (HGMMA) for its dots, or a loop structure the counts cannot read."""
    out = []
    if r.get("error"):
        out.append(r["error"])
    if r["local"] or r["spill_ops"]:
        out.append(f"register spill ({r['local']} bytes local memory, {r['spill_ops']} spill instructions, "
                   f"{r['regs']} registers)")
    if r["shared"] > SMEM_LIMIT[r["arch"]]:
        out.append(f"shared memory {r['shared']} B over the sm_{r['arch']} per-block limit {SMEM_LIMIT[r['arch']]} B")
    if r["arch"] == 90 and r["dtype"] != "fp32" and (r["hmma"] or not r["hgmma"]):
        out.append(f"16-bit dots not all on wgmma ({r['hgmma']} HGMMA, {r['hmma']} HMMA instructions)")
    return out


def name_of(r):
    return (f"sm_{r['arch']} {r['pass_']} {r['kind']} p={r['p']:g}{' gate' if r['gate'] else ''} {r['dtype']} "
            f"d={r['D']}")


def run_all(cfgs, n_workers):
    from tqdm import tqdm
    rows = []
    with ProcessPoolExecutor(max_workers=n_workers or os.cpu_count()) as pool:
        for r in tqdm(pool.map(analyse, cfgs), total=len(cfgs), desc="compile + disassemble", unit="kernel",
                      file=sys.stderr):
            rows.append(r)
    return rows


def with_ratios(rows):
    """Each row's estimate and per-score instructions as ratios to the exp kernel (p = 0, no gate: FlashAttention's
    work) of the same pass, arch, dtype, head size and T."""
    key = lambda r: (r["arch"], r["pass_"], r["dtype"], r["D"], r["T"])
    ref = {key(r): r for r in rows if r["kind"] == "exp" and r["p"] == 0 and not r["gate"] and "estimate" in r}
    for r in rows:
        base = ref.get(key(r))
        if base and "estimate" in r:
            r["x_exp_estimate"] = round(r["estimate_per_score"] / base["estimate_per_score"], 3)
            r["x_exp_instructions"] = round(r["per_score_all"] / base["per_score_all"], 3)
    return rows


def markdown(rows, command):
    import triton
    lines = [f"`{command}`", "",
             f"Estimate from the compiled code (triton {triton.__version__}, ptxas of its wheel), not a measurement: "
             "per score element of the steady-state key loop(s), and the estimated cycles per score as a ratio to "
             "the exp kernel (softmax, p = 0) of the same pass. See kernels/sass.py for the model.", "",
             "| arch | pass | kind | p | gate | dots | d | tile (BM, BN, warps, stages) | regs | spill | smem KB "
             "| instr/score | x exp | fp32 FMA pipe | cmp/sel | MUFU | int/other | tensor ops per tile | bound "
             "| est. x exp |", "|" + "---|" * 20]
    for r in rows:
        if "estimate" not in r:
            lines.append(f"| sm_{r['arch']} | {r['pass_']} | {r['kind']} | {r['p']:g} | {'forget' if r['gate'] else ''} | "
                         f"{r['dtype']} | {r['D']} | | | | | error: {r.get('error')} |" + " |" * 8)
            continue
        ps = r["per_score"]
        mufu = " + ".join(f"{v:g} {k[5:]}" for k, v in ps.items() if k.startswith("MUFU")) or "0"
        tc = ", ".join(f"{v} {k}" for k, v in r["tensor_ops"].items())
        lines.append(f"| sm_{r['arch']} | {r['pass_']} | {r['kind']} | {r['p']:g} | {'forget' if r['gate'] else ''} | "
                     f"{r['dtype']} | {r['D']} | {tuple(r['tile'])} | {r['regs']} | {r['local']} | {r['shared'] / 1024:.0f} | "
                     f"{r['per_score_all']:.1f} | {r.get('x_exp_instructions', 0):.2f} | "
                     f"{ps.get('fp32 fma pipe', 0):.1f} | {ps.get('fp32 compare/select', 0):.1f} | {mufu} | "
                     f"{ps.get('integer/other', 0):.1f} | {tc} | {r['bound']} | {r.get('x_exp_estimate', 0):.2f} |")
    return "\n".join(lines) + "\n"


def report(cfgs):
    rows = with_ratios(run_all(cfgs, workers))
    command = "python -m kernels.sass " + " ".join(sys.argv[1:])
    import triton
    meta = dict(command=command, triton=triton.__version__, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                pipes=PIPES, smem_limit=SMEM_LIMIT, note="estimate from the compiled code, not a measurement")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "kernels": rows}, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(markdown(rows, command))
    bad = [(r, problems(r)) for r in rows if problems(r)]
    for r, why in bad:
        print(f"PROBLEM {name_of(r)}: {'; '.join(why)}")
    print(f"wrote {out}.json, {out}.md ({len(rows)} kernels, {len(bad)} with problems)")


def check(cfgs):
    """Exit 1 with one line per unacceptable kernel (problems), else print how many were compiled."""
    rows = run_all(cfgs, workers)
    bad = [(r, problems(r)) for r in rows if problems(r)]
    for r, why in bad:
        print(f"FAIL {name_of(r)} tile={tuple(r['tile'])}: {'; '.join(why)}")
    print(f"checked {len(rows)} kernels: {len(rows) - len(bad)} ok, {len(bad)} failed "
          f"({sum(r['compile_s'] for r in rows):.0f} s of compiling)")
    return 1 if bad else 0


# -----------------------------------------------------------------------------
# accuracy of the elementwise functions (numpy, float32 arithmetic as the GPU does it)


def fma32(a, b, c):
    """float32 fused multiply-add: the float32 product is exact in float64, the sum rounded once (to float64, then
    float32: a double rounding, off by at most one float32 ulp in rare ties)."""
    import numpy as np
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def horner32(coefs, y):
    import numpy as np
    c = [np.float32(x) for x in coefs]
    r = np.full_like(y, c[-1])
    for ci in c[-2::-1]:
        r = fma32(r, y, np.full_like(y, ci))
    return r


def kernel_softplus_sigmoid(x, fast):
    """What the kernels compute for base-2 scores x (float32): (log2(1 + 2^x), sigmoid(x ln 2)), with exp2
    correctly rounded (the GPU's ex2.approx adds its own error: not modelled)."""
    import numpy as np

    from kernels.triton_attn import POLY
    L, R = (POLY["L4"], POLY["R5"]) if fast else (POLY["L7"], POLY["R8"])
    y = np.exp2(-np.abs(x.astype(np.float64))).astype(np.float32)
    w = fma32(y, horner32(L, y), np.maximum(x, np.float32(0)))
    r = horner32(R, y)
    return w, np.where(x >= 0, r, (y.astype(np.float64) * r).astype(np.float32))


def accuracy_of(x, fast):
    """Largest relative errors (softplus, sigmoid) over float32 x, against float64; results below float32's
    smallest normal (2^-126, flushed to zero on the GPU; QK-norm keeps attention's scores far from them) excluded."""
    import numpy as np
    w, dw = kernel_softplus_sigmoid(x, fast)
    x64 = x.astype(np.float64)
    w64, dw64 = np.logaddexp2(0.0, x64), 1.0 / (1.0 + np.exp2(-x64))
    ok_w, ok_dw = w64 >= 2.0**-126, dw64 >= 2.0**-126
    ew = np.abs(w.astype(np.float64) - w64)[ok_w] / w64[ok_w]
    edw = np.abs(dw.astype(np.float64) - dw64)[ok_dw] / dw64[ok_dw]
    return float(ew.max(initial=0.0)), float(edw.max(initial=0.0))


BINADES = (-40, 7)  # |x| in [2^-40, 2^7): below, 2^-|x| rounds to 1 in float32 (every such x behaves like 2^-40);
# above 126 the exact result is x itself (x > 0) or below float32's normal range (x < 0)


def float32_binades(lo=BINADES[0], hi=BINADES[1], step=1):
    """Every float32 x with 2^lo <= |x| < 2^hi (every step-th bit pattern), one binade of one sign at a time."""
    import numpy as np
    for sign in (0, 1 << 31):
        for e in range(lo, hi):
            first = (e + 127) << 23
            bits = (np.arange(first, first + (1 << 23), step, dtype=np.uint64) | sign).astype(np.uint32)
            yield bits.view(np.float32)


def accuracy():
    from tqdm import tqdm
    res = {}
    n = 2 * (BINADES[1] - BINADES[0])
    for fast in (False, True):
        ew = edw = 0.0
        for x in tqdm(float32_binades(), total=n, desc=f"float32 binades ({'16-bit' if fast else 'fp32'} polynomials)",
                      file=sys.stderr):
            a, b = accuracy_of(x, fast)
            ew, edw = max(ew, a), max(edw, b)
        res["16-bit dots" if fast else "fp32 dots"] = {"softplus_max_rel_error": ew, "sigmoid_max_rel_error": edw}
    path = os.path.join(os.path.dirname(out) or ".", "softplus_accuracy.json")
    with open(path, "w") as f:
        json.dump({"command": "python -m kernels.sass " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                   "what": f"max relative error over every float32 x (a base-2 score) with 2^{BINADES[0]} <= |x| < "
                           f"2^{BINADES[1]} whose exact result is >= 2^-126, multiply-adds fused, exp2 correctly rounded",
                   "results": res}, f, indent=1)
    print(json.dumps(res, indent=1))
    print(f"wrote {path}")


def fit_poly(f, degree, n=6000, iters=400):
    """Minimax (relative error) polynomial coefficients of f on [0, 1] by Lawson's iteratively reweighted least
    squares on Chebyshev points."""
    import numpy as np
    y = (np.cos(np.linspace(0.0, np.pi, n)) + 1.0) / 2.0
    t = f(y)
    V = np.vander(y, degree + 1, increasing=True)
    w = np.full(n, 1.0 / n)
    for _ in range(iters):
        s = np.sqrt(w)
        c = np.linalg.lstsq(V / t[:, None] * s[:, None], s, rcond=None)[0]
        w = w * np.abs(V @ c / t - 1.0) + 1e-300
        w /= w.sum()
    return [float(np.float32(x)) for x in c]


def fit():
    import numpy as np
    log2_1p_over = lambda y: np.where(y == 0, 1.0 / np.log(2.0), np.log1p(y) / np.log(2.0) / np.where(y == 0, 1.0, y))
    for name, f, deg in (("L7", log2_1p_over, 7), ("R8", lambda y: 1 / (1 + y), 8), ("L4", log2_1p_over, 4),
                         ("R5", lambda y: 1 / (1 + y), 5)):
        print(f'"{name}": {tuple(fit_poly(f, deg))},')


def estimate_ratio(rows, kind, p, gate, passes, arch=90, dtype="bf16", D=64):
    """The estimated cycles per score of (kind, p, gate) over the given passes, as a ratio to the exp kernel's
    (p = 0, no gate) over the same passes: the static prediction of a measured time ratio."""
    pick = lambda k, pp, g, ps: next((r["estimate_per_score"] for r in rows if (r["arch"], r["dtype"], r["D"], r["kind"],
                                      r["p"], r["gate"], r["pass_"]) == (arch, dtype, D, k, pp, g, ps)
                                      and "estimate_per_score" in r), None)
    mine, ref = [pick(kind, p, gate, ps) for ps in passes], [pick("exp", 0.0, False, ps) for ps in passes]
    return None if None in mine + ref else sum(mine) / sum(ref)


def main():
    if "triton" not in sys.modules:  # before triton_attn imports triton: real @jit functions, not interpreted
        os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # FMA contraction, triton's default (silences its warning)
    from common import parse_list, parse_numbers
    from configurator import configure
    configure(globals())
    if mode not in ("report", "check", "accuracy", "fit"):
        raise SystemExit(f"sass error: mode must be report, check, accuracy or fit, got {mode!r}")
    if mode == "fit":
        return fit()
    if mode == "accuracy":
        return accuracy()
    from kernels import triton_attn as K
    if K._interpreting():
        raise SystemExit("sass error: TRITON_INTERPRET is set, so the kernels cannot be compiled; run "
                         "`TRITON_INTERPRET=0 python -m kernels.sass`")
    args = (parse_numbers(heads, "heads", prefix="sass error"), parse_list(dtypes),
            parse_numbers(ps, "ps", float, prefix="sass error", ok=lambda x: x >= 0, what="numbers >= 0"),
            parse_list(kinds), parse_numbers(archs, "archs", prefix="sass error"))
    for name, values, known in (("dtypes", args[1], DTYPES), ("kinds", args[3], K.KINDS), ("archs", args[4], ARCHS)):
        if not values or any(x not in known for x in values):
            raise SystemExit(f"sass error: {name} must be a comma list of {', '.join(map(str, known))}, got {values}")
    cfgs = configs(T, *args)
    if mode == "check":
        sys.exit(check(cfgs))
    report(cfgs)


if __name__ == "__main__":
    main()
