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
def steady_loops(pass_, reweight, window, stick):
    """(loops in the compiled code, the indices of the steady-state ones: the unmasked sweeps), in source order.
    Forward p = 0 [unmasked, diagonal], p > 0 [sweep 1 unmasked, diagonal, sweep 2 unmasked, diagonal]; dq
    [unmasked, diagonal]; dk/dv [diagonal, unmasked]; a window adds a masked loop for its lower edge before each
    forward / dq sweep and after the dk / dv one. Stick-breaking (nearest first): [diagonal, unmasked] everywhere."""
    if stick:
        return 2, [1]
    if pass_ == "fwd":
        per = 3 if window else 2
        return (2 * per, [per - 2, 2 * per - 2]) if reweight else (per, [per - 2])
    return (3, [1]) if window else (2, [1] if pass_ == "dkdv" else [0])


DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "fp16": (torch.float16, torch.float16)}

# -----------------------------------------------------------------------------
mode = "report"          # report | check | accuracy | fit
heads = "64,128"         # head sizes
dtypes = "fp32,bf16,fp16"  # q.k dots' dtype (v the same)
ps = "0,15"              # re-weighting powers
kinds = "softplus,exp,stickbreak,stickbreak_self"
archs = "80,90"
subset = ""              # check: "" = every config; "ci" = ci_configs(), the representative subset tests/test_sass.py
                         # compiles (every tile entry and every kernel kind at least once)
features = ""            # the score kinds' extras: "single" = none, the gate, ALiBi, a window, each alone (the
                         # report's default); "all" = every combination of the three (--mode=check's default)
window = 1024            # the window of the windowed configs
visit_T = 16384          # the sequence length of the report's work count (key tiles visited per query tile)
T = 4096                 # the sequence length the launchers pick tiles for (the tiles do not depend on it)
workers = 0              # compile processes; 0 = one per CPU
out = "results/bench/sass"
# -----------------------------------------------------------------------------


def _bin(tool):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def feature_sets(which, W):
    """(gate, alibi, window) of the score kinds' configs: "single" (none, then each alone) or "all" (every
    combination)."""
    if which == "single":
        return [(False, False, 0), (True, False, 0), (False, True, 0), (False, False, W)]
    return [(g, a, w) for g in (False, True) for a in (False, True) for w in (0, W)]


def configs(Tq, heads_, dtypes_, ps_, kinds_, archs_, features_=((False, False, 0), (True, False, 0))):
    """Every (arch, pass, kind, p, dtype, head size, forget gate, ALiBi, window) to compile, features_ the (gate,
    alibi, window) sets of the score kinds (at sequence length Tq: the tiles do not depend on it). Stick-breaking
    takes none of p > 0, the gate, ALiBi or a window: one config per (arch, dtype, head size, pass)."""
    from kernels.triton_attn import STICK
    out = []
    for a in archs_:
        for g, al, w in features_:
            for k in kinds_:
                if k in STICK and (g or al or w):
                    continue
                for p in ps_:
                    if k in STICK and p:
                        continue
                    out += [dict(arch=a, pass_=pn, kind=k, p=p, dtype=dt, D=D, T=Tq, gate=g, alibi=al, window=w)
                            for dt in dtypes_ for D in heads_ for pn in ("fwd", "dq", "dkdv")]
    return out


def tile_entry(cfg):
    """The TILES / TILES_EXCEPT entry that gives the config's kernel its tile (triton_attn.tile_key)."""
    from kernels import triton_attn as K
    return K.tile_key(cfg["pass_"], cfg["D"], DTYPES[cfg["dtype"]][0].itemsize, cfg["p"], cfg["arch"], cfg["gate"],
                      cfg["kind"], cfg.get("alibi", False), cfg.get("window", 0) > 0)


def ci_configs(W=1024):
    """The representative subset of the full matrix that CI compiles (tests/test_sass.py; the full matrix is
    `--mode=check`): configs of fp32 and bf16 dots (fp16 launches take bf16's tiles), picked greedily (the config
    that covers the most of what is not yet covered; ties to the first in the order sm_90, head size 64, bf16) until
    they cover:
      - every entry of TILES and TILES_EXCEPT (an sm_80 entry on sm_80),
      - every (kind, pass) of the score kinds with no extras and with each of the gate, ALiBi and a window alone,
        and with and without the re-weighting with all three together (every compile-time branch of the score
        kernels meets every other),
      - stick-breaking's two kinds x three passes.
    A tile that spills only for some other combination (a dtype, head size or architecture its entry does not
    name) is left to the full check."""
    from kernels import triton_attn as K
    cfgs = configs(T, [64, 128], ["bf16", "fp32"], [0.0, 15.0], list(K.KINDS), [90, 80], feature_sets("all", W))
    need = {("tile", k) for k in list(K.TILES) + list(K.TILES_EXCEPT)}
    singles, every = [(False, False, 0), (True, False, 0), (False, True, 0), (False, False, W)], (True, True, W)
    need |= {("kernel", k, pn, None, f) for k in ("softplus", "exp") for pn in ("fwd", "dq", "dkdv") for f in singles}
    need |= {("kernel", k, pn, p > 0, every) for k in ("softplus", "exp") for pn in ("fwd", "dq", "dkdv") for p in (0, 15)}
    need |= {("kernel", k, pn, None, singles[0]) for k in K.STICK for pn in ("fwd", "dq", "dkdv")}
    covers = []
    for c in cfgs:
        f = (c["gate"], c["alibi"], c["window"])
        covers.append({("tile", tile_entry(c)), ("kernel", c["kind"], c["pass_"], None, f),
                       ("kernel", c["kind"], c["pass_"], c["p"] > 0, f)})
    picked = []
    while need:  # greedy set cover: the config that covers the most of what is left (the first such, in order)
        i = max(range(len(cfgs)), key=lambda j: len(covers[j] & need))
        assert covers[i] & need, f"no config covers {sorted(need, key=str)[:5]}"
        picked.append(cfgs[i])
        need -= covers[i]
    return picked


def launch_of(cfg):
    """The launch triton_attn makes for this config (meta tensors: shapes, dtypes and alignment are all it needs)."""
    from kernels import triton_attn as K
    qd, vd = DTYPES[cfg["dtype"]]
    q = torch.empty(1, 12, cfg["T"], cfg["D"], dtype=qd, device="meta")
    v = torch.empty(1, 12, cfg["T"], cfg["D"], dtype=vd, device="meta")
    c = torch.empty(1, 12, cfg["T"], dtype=torch.float32, device="meta") if cfg.get("gate") else None
    slopes = torch.empty(12, dtype=torch.float32, device="meta") if cfg.get("alibi") else None
    ls = K.launches(q, q, v, 0, float(cfg["p"]), cfg["kind"], 3, backward=cfg["pass_"] != "fwd" or None, c=c,
                    arch=cfg["arch"], slopes=slopes, window=cfg.get("window", 0))
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

    _, kernel, _, args, meta = launch[:5]
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
    name, meta = launch[0], launch[4]
    warps, bm, bn = meta["num_warps"], meta["BLOCK_M"], meta["BLOCK_N"]
    t0 = time.time()
    cubin, shared = compile_launch(launch, cfg["arch"])
    ins, labels, res = disassemble(cubin)
    found = loops(ins, labels)
    from kernels.triton_attn import STICK
    want, steady = steady_loops(name, cfg["p"] > 0, cfg.get("window", 0) > 0, cfg["kind"] in STICK)
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


def extras(r):
    """The config's extras in words: 'forget', 'alibi', 'window=1024' (joined by spaces), or ''."""
    return " ".join(["forget"] * bool(r["gate"]) + ["alibi"] * bool(r.get("alibi")) +
                    [f"window={r['window']}"] * bool(r.get("window")))


def name_of(r):
    return f"sm_{r['arch']} {r['pass_']} {r['kind']} p={r['p']:g} {extras(r)} {r['dtype']} d={r['D']}".replace("  ", " ")


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
    ref = {key(r): r for r in rows if r["kind"] == "exp" and r["p"] == 0 and not extras(r) and "estimate" in r}
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
             "| arch | pass | kind | p | extras | dots | d | tile (BM, BN, warps, stages) | regs | spill | smem KB "
             "| instr/score | x exp | fp32 FMA pipe | cmp/sel | MUFU | int/other | tensor ops per tile | bound "
             "| est. x exp |", "|" + "---|" * 20]
    for r in rows:
        if "estimate" not in r:
            lines.append(f"| sm_{r['arch']} | {r['pass_']} | {r['kind']} | {r['p']:g} | {extras(r)} | "
                         f"{r['dtype']} | {r['D']} | | | | | error: {r.get('error')} |" + " |" * 8)
            continue
        ps = r["per_score"]
        mufu = " + ".join(f"{v:g} {k[5:]}" for k, v in ps.items() if k.startswith("MUFU")) or "0"
        tc = ", ".join(f"{v} {k}" for k, v in r["tensor_ops"].items())
        lines.append(f"| sm_{r['arch']} | {r['pass_']} | {r['kind']} | {r['p']:g} | {extras(r)} | "
                     f"{r['dtype']} | {r['D']} | {tuple(r['tile'])} | {r['regs']} | {r['local']} | {r['shared'] / 1024:.0f} | "
                     f"{r['per_score_all']:.1f} | {r.get('x_exp_instructions', 0):.2f} | "
                     f"{ps.get('fp32 fma pipe', 0):.1f} | {ps.get('fp32 compare/select', 0):.1f} | {mufu} | "
                     f"{ps.get('integer/other', 0):.1f} | {tc} | {r['bound']} | {r.get('x_exp_estimate', 0):.2f} |")
    lines += ["", *alibi_section(rows), "", *window_section(rows)]
    return "\n".join(lines) + "\n"


def _without(r, rows, **change):
    """The row of the same config with some fields changed (e.g. alibi=False), or None."""
    want = {k: r.get(k) for k in ("arch", "pass_", "kind", "p", "dtype", "D", "T", "gate", "alibi", "window")} | change
    return next((x for x in rows if all(x.get(k, False if k == "alibi" else 0 if k == "window" else None) == v
                                        for k, v in want.items()) and "estimate" in x), None)


def alibi_section(rows):
    """Each ALiBi kernel against its kind without ALiBi (same pass, arch, dtype, head size, p, gate, window)."""
    lines = ["ALiBi: each kernel with ALiBi against the same kernel without it (estimated cycles per score, and "
             "instructions per score).", "", "| arch | pass | kind | p | dots | d | tile | instr/score | x without | "
             "est. x without |", "|" + "---|" * 10]
    for r in rows:
        base = _without(r, rows, alibi=False) if r.get("alibi") and "estimate" in r else None
        if base:
            lines.append(f"| sm_{r['arch']} | {r['pass_']} | {r['kind']} | {r['p']:g} | {r['dtype']} | {r['D']} | "
                         f"{tuple(r['tile'])} | {r['per_score_all']:.1f} | {r['per_score_all'] / base['per_score_all']:.2f} | "
                         f"{r['estimate_per_score'] / base['estimate_per_score']:.2f} |")
    return lines


def window_section(rows):
    """Each windowed kernel against the same kernel without a window: its steady-state cost per score, and the work
    of a whole call at visit_T (key tiles visited, masked or not, per query tile; per key tile for dk / dv: tiles_of)."""
    lines = [f"Windows: each windowed kernel against the same kernel without a window: cycles per score of the "
             f"steady-state loop, and the tiles a call at T = {visit_T} visits (kernels/sass.py tiles_of: the "
             "launchers' loop bounds), per program (query block; key block for dk / dv), masked + unmasked.", "",
             "| arch | pass | kind | p | dots | d | window | tile | est. per score x no window | tiles per program, window "
             "| no window | work x no window | visible scores x no window |", "|" + "---|" * 13]
    for r in rows:
        base = _without(r, rows, window=0) if r.get("window") and "estimate" in r else None
        if not base:
            continue
        bm, bn = r["tile"][:2]
        mw, uw, n = tiles_of(r["pass_"], r["kind"], visit_T, bm, bn, r["window"])
        m0, u0, _ = tiles_of(r["pass_"], r["kind"], visit_T, bm, bn, 0)
        lines.append(f"| sm_{r['arch']} | {r['pass_']} | {r['kind']} | {r['p']:g} | {r['dtype']} | {r['D']} | "
                     f"{r['window']} | {tuple(r['tile'])} | {r['estimate_per_score'] / base['estimate_per_score']:.2f} | "
                     f"{(mw + uw) / n:.1f} ({mw / n:.1f} masked) | {(m0 + u0) / n:.1f} ({m0 / n:.1f} masked) | "
                     f"{(mw + uw) / (m0 + u0):.3f} | {visible(visit_T, r['window']) / visible(visit_T, 0):.3f} |")
    return lines


def visible(T, W):
    """The (query, key) pairs a causal call of T rows computes with, under a window of W keys (0: none)."""
    W = W or T
    return W * (W + 1) // 2 + (T - W) * W


def tiles_of(pass_, kind, T, bm, bn, W):
    """(masked tiles, unmasked tiles, programs) a call of T queries and keys visits: the loop bounds of the
    launchers' kernels (triton_attn _key_range, _bwd_dkdv_kernel, the stick-breaking kernels), written out here for
    the report (tests/test_sass.py checks them against every tile that holds a visible score)."""
    from kernels.triton_attn import STICK
    cdiv = lambda a, b: -(-a // b)
    masked = unmasked = 0
    if pass_ != "dkdv":
        for m0 in range(0, T, bm):
            first, last = m0, min(m0 + bm, T) - 1
            if kind in STICK:
                self_ = kind == "stickbreak_self"
                top, full = (last // bn) * bn, ((first + self_) // bn) * bn
                masked += max((top - full) // bn + 1, 0)
                unmasked += full // bn
                continue
            full, hi = ((first + 1) // bn) * bn, last + 1
            lo = mid = 0
            if W:
                lo = (max(first - W + 1, 0) // bn) * bn
                mid = min(max(cdiv(max(last - W + 1, 0), bn) * bn, lo), full)
            masked += cdiv(max(mid - lo, 0), bn) + cdiv(max(hi - full, 0), bn)
            unmasked += cdiv(max(full - mid, 0), bn)
        return masked, unmasked, cdiv(T, bm)
    for n0 in range(0, T, bn):
        lo = (n0 // bm) * bm
        if kind in STICK:
            full = max(cdiv(n0 + bn, bm) * bm, lo)
            masked += cdiv(max(min(full, T) - lo, 0), bm)
            unmasked += cdiv(max(T - full, 0), bm)
            continue
        full = max(cdiv(n0 + bn - 1, bm) * bm, lo)
        if W:
            hi = max(min(T, n0 + bn - 1 + W), lo)
            b = min(full, hi)
            mid = min(max((max(n0 + W, 0) // bm) * bm, b), hi)
        else:
            hi = mid = T
            b = min(full, T)
        masked += cdiv(max(b - lo, 0), bm) + cdiv(max(hi - mid, 0), bm)
        unmasked += cdiv(max(mid - b, 0), bm)
    return masked, unmasked, cdiv(T, bn)


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


def check(cfgs, summary=None):
    """Exit 1 with one line per unacceptable kernel (problems), else print how many were compiled; summary: also
    write that to this markdown file (the full check's record, results/bench/sass_check.md)."""
    import triton
    t0 = time.time()
    rows = run_all(cfgs, workers)
    bad = [(r, problems(r)) for r in rows if problems(r)]
    lines = [f"FAIL {name_of(r)} tile={tuple(r['tile'])}: {'; '.join(why)}" for r, why in bad]
    lines.append(f"checked {len(rows)} kernels: {len(rows) - len(bad)} ok, {len(bad)} failed "
                 f"({sum(r['compile_s'] for r in rows):.0f} s of compiling)")
    print("\n".join(lines))
    if summary:
        count = lambda key: ", ".join(f"{v}: {sum(str(r[key]) == str(v) for r in rows)}"
                                      for v in sorted({str(r[key]) for r in rows}))
        with open(summary, "w") as f:
            f.write(f"`python -m kernels.sass {' '.join(sys.argv[1:])}`\n\ntriton {triton.__version__}, "
                    f"{time.strftime('%Y-%m-%d')}, {time.time() - t0:.0f} s on {os.cpu_count()} CPUs. Every config "
                    "compiled for its architecture and checked for register spills, shared memory over the per-block "
                    "limit and (sm_90, 16-bit dots) dots not all on wgmma.\n\n" + "\n".join(f"    {x}" for x in lines) +
                    f"\n\nConfigs by arch ({count('arch')}), pass ({count('pass_')}), kind ({count('kind')}), dots "
                    f"({count('dtype')}), head size ({count('D')}), gate ({count('gate')}), ALiBi ({count('alibi')}), "
                    f"window ({count('window')}), p ({count('p')}).\n")
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


def estimate_ratio(rows, kind, p, gate, passes, arch=90, dtype="bf16", D=64, alibi=False, window=0):
    """The estimated cycles per score of (kind, p, gate, alibi, window) over the given passes, as a ratio to the exp
    kernel's (p = 0, no extras) over the same passes: the static prediction of a measured time ratio (per score
    computed: a window's fewer scores are not in it)."""
    pick = lambda k, pp, g, a, w, ps: next((r["estimate_per_score"] for r in rows if (
        r["arch"], r["dtype"], r["D"], r["kind"], r["p"], r["gate"], r.get("alibi", False), r.get("window", 0),
        r["pass_"]) == (arch, dtype, D, k, pp, g, a, w, ps) and "estimate_per_score" in r), None)
    mine = [pick(kind, p, gate, alibi, window, ps) for ps in passes]
    ref = [pick("exp", 0.0, False, False, 0, ps) for ps in passes]
    return None if None in mine + ref else sum(mine) / sum(ref)


def main():
    if "triton" not in sys.modules:  # before triton_attn imports triton: real @jit functions, not interpreted
        os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # FMA contraction, triton's default (silences its warning)
    from configurator import configure
    from options import parse_list, parse_numbers
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
    which = features or ("all" if mode == "check" else "single")
    if which not in ("single", "all") or not (isinstance(window, int) and window > 0):
        raise SystemExit(f"sass error: features must be single or all and window a whole number > 0, got {features!r}, "
                         f"{window!r}")
    cfgs = configs(T, *args, feature_sets(which, window))
    if mode == "check" and subset == "ci":
        cfgs = ci_configs(window)
    elif subset:
        raise SystemExit(f"sass error: subset must be '' (every config) or ci, got {subset!r}")
    if mode == "check":
        sys.exit(check(cfgs, None if subset else out + "_check.md"))
    report(cfgs)


if __name__ == "__main__":
    main()
