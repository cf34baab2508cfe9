"""
Speed and peak memory of every attention kind x backend, alone and inside the model, with ratios to
softmax through SDPA measured in the same run.

    python bench.py                  # every kind x backend x length (long on a CPU: docs/backends.md's subset,
                                     # 4 kinds x 3 lengths, took 26 min on 2 cores; its command is given there)
    python bench.py --quick          # a small run (67 s on 2 cores): short lengths, no GPT-2-small, no memory
    python bench.py --device=cuda    # on a GPU: adds the GPT-2-small train step at 1024 tokens, eager and compiled

What is measured (every number is the best of `repeats` runs after one warm-up, rounds interleaved so that
noise hits every case alike):
  attn   causal_attention alone on one layer's q, k, v (attn_batch x attn_heads x T x head_dim): forward
         (no grad) and forward+backward where the backend has a backward, for each kind x backend x length
  eval   a GPT-2-small (124M) forward with loss, batch 1, at `eval_lengths` (eval_length.py's work)
  train  a train step (forward, backward, AdamW) of the CPU demo model at `train_len` tokens (and, on CUDA,
         of GPT-2-small at 1024 tokens, eager and under torch.compile)
The `triton` backend runs on CUDA; on a CPU it would only run through Triton's interpreter, so it is reported
as "interpreter, not timed".
Peak memory: on CUDA max_memory_allocated over the call; on CPU the rise of the process's peak resident set
(VmHWM) over the call, measured in a fresh subprocess with glibc's mmap threshold pinned so freed tensors
leave the resident set (so it counts what the call allocates, like the CUDA number).
Writes <out>.json (every measurement, the settings and the machine) and prints the tables.
"""

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from configurator import configure
from kernels import BACKENDS
from model import GPT, VARIANTS, GPTConfig, attn_names, canonical_attn, causal_attention
from options import check_range, one_line, parse_list, parse_numbers, pick_device, split_top, writable_prefix

# -----------------------------------------------------------------------------
kinds = ""               # "" = every attention of model.py's registry, each with the forget gate (name+forget), and
                         # softmax / lssar with ALiBi (name+alibi) and with a window of attn_window keys (name+window)
attn_window = 1024       # the window of the name+window kinds (kernels/sass.py reports windowed kernels at 1024)
backends = "sdpa,math,flex,triton"
lengths = LENGTHS = "64,256,1024,4096,16384"
grad_max_len = 4096      # forward+backward of attention alone up to this length
attn_batch = 1
attn_heads = 12          # one GPT-2-small layer: 12 heads of 64
head_dim = 64
eval_kinds = "softmax,lssa,lssar"
eval_lengths = "16384"   # GPT-2-small forward, batch 1 ("" to skip)
train_kinds = "softmax,lssa,lssar"
decode_kinds = "softmax,[3*softmax:window=64,softmax:pos=none:temp=logn]"  # KV-cache decoding of the demo model, batch
                         # 1: a uniform stack against a SWAN-style one, whose windowed layers keep only their last keys
decode_lengths = DECODE_LENGTHS = "1024,4096"  # tokens decoded one at a time ("" to skip; --quick: 256)
train_len = 256          # CPU demo model train step (4 layers, 128 wide, 4 heads), batch 16
train_batch = 16
gpt2_train = "auto"      # GPT-2-small train step at 1024 tokens: auto = on CUDA only | true | false
train_compile = "auto"   # also time the train steps under torch.compile: auto = on CUDA only | true | false
memory = "auto"          # measure peak memory: auto = yes except with --quick (on CPU: one subprocess per case)
repeats = 3
quick = False            # small run: lengths 64,256,1024, no GPT-2-small
device = "auto"
dtype = "auto"           # auto: bfloat16 autocast on CUDA, float32 on CPU
out = ""                 # default results/bench/bench_<device>[_quick]
mem_case = ""            # internal: measure the memory of one case (JSON) in this process and print it
precision = False        # the precision study of the q . k dots instead of timings (PRECISION below): results/bench/
                         # precision.{json,md}; with precision_ckpt also the q, k of a trained checkpoint's layers
precision_ckpt = ""
precision_lengths = "2048,4096,8192,16384"
compare = ""             # a bench.py --device=cuda results .json: its Triton times next to the static estimates of
                         # results/bench/sass.json (python -m kernels.sass), written to results/bench/estimate_vs_measured.md
# -----------------------------------------------------------------------------


def _sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(dev, dt):
    return torch.autocast("cuda" if dev.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=dt == "bfloat16")


DEMO = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=65)  # config/train_shakespeare_char.py


def kind_args(kind):
    """A bench kind -> GPTConfig's attention fields: a name of model.attn_names(), with '+forget' for the forget
    gate (e.g. softmax+forget: FoX's attention), '+alibi' for ALiBi, '+window' for a window of attn_window keys; or
    a stack, its layers pattern in brackets ([3*softmax:window=64,softmax:pos=none:temp=logn], model.parse_layers)."""
    if kind.startswith("[") and kind.endswith("]"):
        return dict(layers=kind[1:-1])
    name, *extras = kind.split("+")
    return dict(attn=name, gate="forget" if "forget" in extras else "none", pos="alibi" if "alibi" in extras else "rope",
                window=attn_window if "window" in extras else 0)


def bench_kinds():
    """Every kind bench.py knows: each attention name, each with the forget gate where the gate applies, and softmax
    and lssar with ALiBi and with a window (the fused kernels' extras)."""
    gated = [f"{a}+forget" for a in attn_names() if VARIANTS[canonical_attn(a)[0]].row is None]
    return attn_names() + gated + [f"{a}+{x}" for x in ("alibi", "window") for a in ("softmax", "lssar")]
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)  # config/train_gpt2_fineweb.py


def split_kinds(text, key="decode_kinds"):
    """A comma list of bench kinds and [layers pattern] stacks, each checked as the demo model it builds; a bad one
    stops with one line."""
    out = split_top(text)
    for k in out:
        if k.startswith("["):
            try:
                GPTConfig(block_size=train_len, **kind_args(k), **DEMO)
            except ValueError as e:
                raise SystemExit(f"bench error: {key}: {k}: {one_line(e)}") from None
        elif k not in bench_kinds():
            raise SystemExit(f"bench error: unknown {key} {k}; choose from {', '.join(bench_kinds())}, or a stack "
                             "[layers pattern] of 4 layers, e.g. [3*softmax:window=64,softmax:pos=none:temp=logn]")
    return out


def build(case, dev, dt):
    """Inputs for one case and a function that runs it once (returns nothing)."""
    torch.manual_seed(0)
    what, kind, T = case["what"], case["kind"], case["T"]
    if what == "attn":
        shape = (attn_batch, attn_heads, T, head_dim)
        grad = case["grad"]
        if case["backend"] == "triton" and not dev.startswith("cuda"):
            raise NotImplementedError("interpreter, not timed")
        q, k, v = (torch.randn(shape, device=dev, requires_grad=grad) for _ in range(3))
        go = torch.randn(shape, device=dev)
        cfg = GPTConfig(block_size=T, n_head=attn_heads, n_embd=attn_heads * head_dim, **kind_args(kind))
        spec = cfg.spec
        # the variant's learnable per-head parameters at their initial values; a forget gate's c from random gates
        params = {n: init(attn_heads, T).to(dev).requires_grad_(grad) for n, init in spec.variant.params.items()}
        gate = None
        if spec.gate:
            logf = F.logsigmoid(torch.randn(attn_batch, attn_heads, T, device=dev) + 3.0)
            gate = logf.cumsum(-1).requires_grad_(grad)

        def run():
            with _autocast(dev, dt):
                if grad:
                    y = causal_attention(q, k, v, spec, backend=case["backend"], params=params, gate=gate)
                    y.backward(go)
                    q.grad = k.grad = v.grad = None
                else:
                    with torch.no_grad():
                        causal_attention(q, k, v, spec, backend=case["backend"], params=params, gate=gate)
        return run
    if case.get("backend") == "triton" and not dev.startswith("cuda"):
        raise NotImplementedError("interpreter, not timed")
    if what == "decode":
        return build_decode(case, dev, dt)
    size = GPT2 if case["model"] == "gpt2" else DEMO
    model = GPT(GPTConfig(block_size=T, **kind_args(kind), **size)).to(dev)
    fwd = torch.compile(model) if case.get("compile") else model
    B = case["batch"]
    x = torch.randint(0, size["vocab_size"], (B, T), device=dev)
    y = torch.randint(0, size["vocab_size"], (B, T), device=dev)
    if what == "eval":
        model.eval()

        def run():
            with torch.no_grad(), _autocast(dev, dt):
                fwd(x, y, reduction="sum")
        return run
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.startswith("cuda"))

    def run():
        with _autocast(dev, dt):
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def build_decode(case, dev, dt):
    """The demo model (trained context train_len) decoding T tokens greedily one at a time from one, through its KV
    cache (model.GPT.new_cache). Each run records the cache's bytes at the end in case["cache_bytes"]: a windowed
    layer keeps its last keys only (model.cache_keep), so its share stays flat as T grows."""
    model = GPT(GPTConfig(block_size=train_len, **kind_args(case["kind"]), **DEMO)).to(dev).eval()
    start = torch.zeros(1, 1, dtype=torch.long, device=dev)

    def run():
        cache = model.new_cache()
        x = start
        with torch.no_grad(), _autocast(dev, dt):
            for _ in range(case["T"]):
                logits, _ = model(x, cache=cache)
                x = logits[:, -1:].argmax(-1)
        case["cache_bytes"] = sum(t.numel() * t.element_size() for layer in cache for t in layer.values()
                                  if torch.is_tensor(t))
    return run


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_memory_here(run, dev, warm=True):
    """Bytes allocated at the peak of one call of run() beyond what was live before it (after a warm-up call when
    `warm`: compiles and caches are not counted)."""
    if warm:
        run()
        _sync(dev)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident set
        f.write("5")
    base = _status("VmRSS:")
    run()
    return _status("VmHWM:") - base


def peak_memory(case, dev, dt):
    if dev.startswith("cuda"):
        return peak_memory_here(build(case, dev, dt), dev)
    if not os.path.exists("/proc/self/clear_refs"):
        return None  # not Linux: no cheap way to read a CPU peak
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed tensors >= 128 KiB leave the resident set
    args = [sys.executable, os.path.abspath(__file__), f"--mem_case={json.dumps(case)}", f"--device={dev}",
            f"--dtype={dt}", f"--attn_batch={attn_batch}", f"--attn_heads={attn_heads}", f"--head_dim={head_dim}"]
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"memory subprocess failed for {case}: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"]


def time_cases(cases, dev, dt, label):
    """Best-of-`repeats` seconds per case; warm-up calls first (compiles, allocator), rounds interleaved.
    GPT-2-small evaluation (minutes per call on a CPU) is timed once, on its first call."""
    runs = []
    for c in cases:
        try:
            run = build(c, dev, dt)
            t0 = time.perf_counter()
            run()
            _sync(dev)
            c["first_s"] = time.perf_counter() - t0
            if c.get("compile"):  # a second warm-up: the compiled backward and any recompile happen before timing
                run()
        except (NotImplementedError, ValueError) as e:  # a backend that cannot compute this kind exactly
            c["skipped"] = str(e).split(" (asked")[0]
            run = None
            print(f"  {label} {c['kind']:8s} {c.get('backend', 'auto'):5s}: skipped ({c['skipped']})")
        except Exception as e:  # noqa: BLE001 - e.g. a kernel that fails on this GPU (SOFTPLUS_ATTN_STRICT=1): the
            # case is reported as failed, the other cases are still measured
            c["skipped"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
            run = None
            print(f"  {label} {c['kind']:8s} {c.get('backend', 'auto'):5s}: {c['skipped']}")
        runs.append(run)
    times = [[c["first_s"]] if c["what"] == "eval" and "first_s" in c else [] for c in cases]
    for _ in range(repeats if not all(c["what"] == "eval" for c in cases) else 0):
        for i, run in enumerate(runs):
            if run is None:
                continue
            t0 = time.perf_counter()
            run()
            _sync(dev)
            times[i].append(time.perf_counter() - t0)
    for c, ts in zip(cases, times, strict=True):
        if ts:
            c["seconds"] = min(ts)
    return cases


def describe(c):
    if c["what"] == "decode":
        return f"decode demo T={c['T']:<6d} {c['kind']} (KV cache {c.get('cache_bytes', 0) / 2**20:.2f} MiB)"
    if c["what"] == "attn":
        return f"attn {'fwd+bwd' if c['grad'] else 'fwd':7s} T={c['T']:<6d} {c['kind']:8s} {c['backend']:5s}"
    return f"{c['what']:5s} {c['model']:5s}{' compiled' if c.get('compile') else ''} T={c['T']:<6d} {c['kind']:8s} auto "


def add_ratios(results):
    """ratio = seconds / seconds of softmax-SDPA in the same group (same what, model, T, grad, compile); tokens/s
    ratio is its inverse. Memory ratio likewise."""
    ref = {}
    for c in results:
        if c["kind"] == "softmax" and c.get("backend", "auto") in ("sdpa", "auto") and "seconds" in c:
            ref[(c["what"], c.get("model"), c["T"], c.get("grad"), c.get("compile"))] = c
    for c in results:
        r = ref.get((c["what"], c.get("model"), c["T"], c.get("grad"), c.get("compile")))
        if r and "seconds" in c:
            c["time_vs_softmax_sdpa"] = c["seconds"] / r["seconds"]
            if c.get("peak_bytes") and r.get("peak_bytes"):
                c["memory_vs_softmax_sdpa"] = c["peak_bytes"] / r["peak_bytes"]


def table(results):
    lines = ["| case | T | kind | backend | time | x softmax-SDPA | peak memory | x softmax-SDPA |",
             "|---|---|---|---|---|---|---|---|"]
    for c in results:
        what = c["what"] if c["what"] != "attn" else f"attn {'fwd+bwd' if c['grad'] else 'fwd'}"
        if c["what"] == "decode":
            what += f" demo B=1, KV cache {c.get('cache_bytes', 0) / 2**20:.2f} MiB"
        elif c["what"] != "attn":
            what += f" {c['model']} B={c['batch']}" + (" compiled" if c.get("compile") else "")
        if "seconds" not in c:
            lines.append(f"| {what} | {c['T']} | {c['kind']} | {c.get('backend', 'auto')} | n/a: {c.get('skipped', '')} |"
                         " | | |")
            continue
        mem = c.get("peak_bytes")
        memtxt = f"{mem / 2**20:.0f} MiB" if mem is not None else "-"
        lines.append(f"| {what} | {c['T']} | {c['kind']} | {c.get('backend', 'auto')} | {c['seconds'] * 1e3:.1f} ms | "
                     f"{c.get('time_vs_softmax_sdpa', float('nan')):.2f} | {memtxt} | "
                     f"{c.get('memory_vs_softmax_sdpa', float('nan')):.2f} |")
    return "\n".join(lines)


def plan(dev):
    Ls = parse_list("64,256,1024" if quick and lengths == LENGTHS else lengths, int)
    cases = []
    for T in Ls:
        for grad in ([False, True] if T <= grad_max_len else [False]):
            for kind in parse_list(kinds) if kinds else bench_kinds():
                for be in parse_list(backends):
                    cases.append(dict(what="attn", kind=kind, backend=be, T=T, grad=grad))
    if not quick:
        for T in parse_list(eval_lengths, int):
            cases += [dict(what="eval", model="gpt2", kind=k, T=T, batch=1) for k in parse_list(eval_kinds)]
    on_gpu = dev.startswith("cuda")
    compiled = [False, True] if train_compile.lower() == "true" or (train_compile == "auto" and on_gpu) else [False]
    cases += [dict(what="train", model="demo", kind=k, T=train_len, batch=train_batch, compile=c)
              for c in compiled for k in parse_list(train_kinds)]
    for T in parse_list("256" if quick and decode_lengths == DECODE_LENGTHS else decode_lengths, int):
        cases += [dict(what="decode", model="demo", kind=k, T=T, batch=1) for k in split_kinds(decode_kinds)]
    if not quick and (gpt2_train.lower() == "true" or (gpt2_train == "auto" and on_gpu)):
        cases += [dict(what="train", model="gpt2", kind=k, T=1024, batch=8 if on_gpu else 1, compile=c)
                  for c in compiled for k in parse_list(train_kinds)]
    return cases


def on_signal(signum, frame):
    # SIGTERM / SIGINT: stop as an exception, so that subprocess.run kills a running memory measurement (it does
    # for any exception) and what was measured so far stays saved (after every group)
    raise SystemExit(128 + signum)


MAX_REPEATS, MAX_LENGTH = 100, 1 << 20  # beyond these a run would not end in any useful time


def check_numbers():
    """Counts and sizes in range before anything runs: 0 repeats or a length of 0 would never finish a case."""
    check_range({"repeats": repeats}, 1, MAX_REPEATS, prefix="bench error")
    check_range({k: globals()[k] for k in ("attn_batch", "attn_heads", "head_dim", "train_len", "train_batch",
                                           "attn_window")}, 1, MAX_LENGTH, prefix="bench error")
    check_range({"grad_max_len": grad_max_len}, 0, prefix="bench error")
    for key in ("lengths", "eval_lengths"):
        if globals()[key]:  # "" skips those cases (lengths="": no attention-alone cases, e.g. the train-step stage
            # of .ci/gpu_acceptance; eval_lengths="": no GPT-2-small forward)
            parse_numbers(globals()[key], key, int, prefix="bench error", example="64,256,1024",
                          ok=lambda x: 1 <= x <= MAX_LENGTH, what=f"integers in [1, {MAX_LENGTH}]")


# -----------------------------------------------------------------------------
# PRECISION: what the q . k dots need. The attention output's error when q and k are rounded to 16 bits after
# model.prepare (the Triton kernels' tensor-core inputs, kernels.round_dots in the kernels' base-2 units) against
# float64, LSSA and LSSAR, at head size head_dim and long rows. Every product and sum in float64 through the math
# backend (the GPU's fp32 accumulation adds ~1e-7, far below 16-bit rounding). Inputs: "random" per head a shared
# direction plus noise (q and k correlated as trained heads are: cosines spread around a head-specific mean), and
# "ckpt" the q, k (after RoPE) of every layer of a trained checkpoint on its validation text. Error: max |out - ref|
# / max |ref| over the whole output (the tests' measure), and the median over rows of |out_i - ref_i| / |ref_i|.


def precision_random_qkv(T, H, d, seed):
    """(1, H, T, d) float64 q, k, v: per head a unit direction u plus noise (cosines ~0.3-0.5 on average)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, H, 1, d, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    q = 2.0 * u + torch.randn(1, H, T, d, generator=g, dtype=torch.float64) / d ** 0.5 * 2.0
    k = 1.5 * u + torch.randn(1, H, T, d, generator=g, dtype=torch.float64) / d ** 0.5 * 2.0
    v = torch.randn(1, H, T, d, generator=g, dtype=torch.float64)
    return q, k, v


def precision_checkpoint_qkv(path, T):
    """([(q, k, v) float64 (1, H, T, d) of every layer], the model's GPTConfig) of a checkpoint on the first T
    validation tokens."""
    import model as M
    from dataset import load_stream
    from runs import load_checkpoint, model_from_checkpoint
    ck = load_checkpoint(path)
    gpt = model_from_checkpoint(ck, "cpu").eval()
    cfg = ck["config"]
    tokens = torch.from_numpy(load_stream(cfg["dataset"], "val", cfg.get("data_dir", ""))[:T].astype("int64"))[None]
    seen, real = [], M.causal_attention

    def record(q, k, v, spec, *a, **kw):
        seen.append((q.double(), k.double(), v.double()))
        return real(q, k, v, spec, *a, **kw)

    M.causal_attention = record
    try:
        with torch.no_grad():
            gpt(tokens)
    finally:
        M.causal_attention = real
    return seen, gpt.config


def precision_errors(q, k, v, spec):
    """{dots: (max relative error, median row relative error)} of the output with q, k rounded, vs float64."""
    import kernels
    import model as M
    from kernels import chunked
    qs, ks = M.prepare(q, k, spec, 0)
    out = {}
    with torch.no_grad():
        ref = chunked.forward(qs, ks, v, spec, 0, 256)
        for dots in ("fp32", "fp16", "bf16"):
            qr, kr = (qs.float().double(), ks.float().double()) if dots == "fp32" else kernels.round_dots(qs, ks, dots)
            err = (chunked.forward(qr, kr, v, spec, 0, 256) - ref).abs()
            row = err.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)
            out[dots] = (float(err.max() / ref.abs().max()), float(row.median()))
    return out


def precision_study():
    from dataclasses import replace

    import model as M
    lens = parse_numbers(precision_lengths, "precision_lengths", prefix="bench error", example="2048,4096")
    rows = []
    for attn in ("lssa", "lssar"):
        spec = M.AttnSpec.of(attn)
        for T in lens:
            q, k, v = precision_random_qkv(T, attn_heads, head_dim, T)
            rows.append(dict(attn=attn, source="random", T=T, head_dim=head_dim, errors=precision_errors(q, k, v, spec)))
            print(f"{attn} random T={T}: {rows[-1]['errors']}", flush=True)
            if precision_ckpt:
                layers, cfg = precision_checkpoint_qkv(precision_ckpt, T)
                cspec = replace(cfg.spec, **dict(zip(("kind", "reweight_p"), M.canonical_attn(attn), strict=True)))
                for i, (lq, lk, lv) in enumerate(layers):
                    rows.append(dict(attn=attn, source=f"{os.path.basename(os.path.normpath(precision_ckpt))} layer {i}",
                                     T=T, head_dim=lq.shape[-1], errors=precision_errors(lq, lk, lv, cspec)))
                    print(f"{attn} {rows[-1]['source']} T={T}: {rows[-1]['errors']}", flush=True)
    command = "python bench.py " + " ".join(sys.argv[1:])
    path = out or os.path.join("results", "bench", "precision")
    lines = [f"`{command}`", "", "Output error with q, k rounded after `prepare` (the q . k dots' inputs), against "
             "float64: max |out - ref| / max |ref| (median row relative error in brackets).", "",
             "| attention | q, k from | head size | T | fp32 | fp16 | bf16 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["errors"]
        cells = " | ".join(f"{e[d][0]:.1e} ({e[d][1]:.1e})" for d in ("fp32", "fp16", "bf16"))
        lines.append(f"| {r['attn']} | {r['source']} | {r['head_dim']} | {r['T']} | {cells} |")
    with open(path + ".json", "w") as f:
        json.dump({"command": command, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}, f,
                  indent=1)
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}.json, {path}.md")


SASS_REPORT = os.path.join("results", "bench", "sass.json")  # kernels/sass.py's report


def compare_with_estimates(path, sass_path=SASS_REPORT):
    """Measured (a GPU run of this script) next to estimated (kernels/sass.py's report of the compiled code): each
    Triton kind's time relative to Triton's exp kernel (softmax) and to SDPA, and the static estimate of the first
    ratio (cycles per score over the same passes, sm_90, bf16, head size 64)."""
    from kernels.fused import KERNEL_KIND
    from kernels.sass import estimate_ratio, visible
    with open(sass_path) as f:
        rows = json.load(f)["kernels"]
    try:
        with open(path) as f:
            cases = json.load(f)["results"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"bench error: cannot read bench results {path!r} ({e}); pass --compare=<a .json of "
                         "bench.py --device=cuda>") from None
    att = [c for c in cases if c["what"] == "attn" and "seconds" in c]
    triton = {(c["kind"], c["T"], c["grad"]): c["seconds"] for c in att if c["backend"] == "triton"}
    sdpa = {(c["T"], c["grad"]): c["seconds"] for c in att if c["backend"] == "sdpa" and c["kind"] == "softmax"}
    lines = [f"`python bench.py --compare={path}`", "",
             f"Measured: {path} (bf16 autocast, {attn_batch} x {attn_heads} heads x T x {head_dim}). Estimated: "
             f"{sass_path} (the compiled code for sm_90, bf16, head size 64: cycles per score over the same passes, "
             "relative to the exp kernel; an estimate, not a measurement).", "",
             "| kind | T | pass | measured x triton softmax | estimated x exp kernel | measured x SDPA |",
             "|---|---|---|---|---|---|"]
    for (kind, T, grad), sec in sorted(triton.items()):
        args = kind_args(kind)
        variant, p = canonical_attn(args["attn"])
        est = estimate_ratio(rows, KERNEL_KIND.get(variant, "?"), p, args["gate"] == "forget",
                             ("fwd", "dq", "dkdv") if grad else ("fwd",), alibi=args["pos"] == "alibi",
                             window=args["window"])
        if est and args["window"]:  # per score computed: a window computes fewer of them
            est *= visible(T, args["window"]) / visible(T, 0)
        base, ref = triton.get(("softmax", T, grad)), sdpa.get((T, grad))
        cells = [f"{sec / base:.2f}" if base else "", f"{est:.2f}" if est else "", f"{sec / ref:.2f}" if ref else ""]
        lines.append(f"| {kind} | {T} | {'fwd+bwd' if grad else 'fwd'} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    target = os.path.join(os.path.dirname(sass_path), "estimate_vs_measured.md")
    with open(target, "w") as f:
        f.write(text)
    print(f"wrote {target}")


def main():
    signal.signal(signal.SIGTERM, on_signal)
    dev = pick_device(device)
    dt = dtype if dtype != "auto" else ("bfloat16" if dev.startswith("cuda") else "float32")
    if compare:
        return compare_with_estimates(compare)
    if precision:
        writable_prefix(out or os.path.join("results", "bench", "precision"), "out", "bench error", (".json", ".md"))
        return precision_study()
    if mem_case:  # subprocess mode: one case as peak_memory hands it over
        try:
            case = json.loads(mem_case)
            if not isinstance(case, dict) or case.get("what") not in ("attn", "eval", "train") or "kind" not in case:
                raise ValueError("not a case")
            fn = build(case, dev, dt)
        except (ValueError, KeyError, TypeError, NotImplementedError) as e:
            raise SystemExit(f"bench error: --mem_case is bench.py's own hand-over of one case to a subprocess, a JSON "
                             f"case it wrote ({type(e).__name__}: {one_line(e)[:100]}); run bench.py without it") from None
        warm = case.get("backend") == "flex" or case["what"] == "train"  # compiles / optimizer state come first
        print(json.dumps({"peak_bytes": peak_memory_here(fn, dev, warm)}))
        return
    for key, allowed in (("kinds", bench_kinds()), ("eval_kinds", bench_kinds()), ("train_kinds", bench_kinds()),
                         ("backends", BACKENDS)):
        bad = [x for x in parse_list(globals()[key]) if x not in allowed]
        if bad:
            raise SystemExit(f"bench error: unknown {key} {', '.join(bad)}; choose from {', '.join(allowed)}")
    split_kinds(decode_kinds)
    check_numbers()
    path = out or os.path.join("results", "bench", f"bench_{dev.split(':')[0]}{'_quick' if quick else ''}")
    writable_prefix(path, "out", "bench error", (".json", ".md"))
    cases = plan(dev)
    print(f"bench: {len(cases)} cases on {dev} ({dt}), best of {repeats}; results -> {path}.json")
    groups = {}
    for c in cases:
        groups.setdefault((c["what"], c.get("model"), c["T"], c.get("grad"), c.get("compile")), []).append(c)
    results = []
    t_start = time.time()
    for gi, group in enumerate(groups.values()):
        label = f"[{gi + 1}/{len(groups)}]"
        time_cases(group, dev, dt, label)
        for c in group:
            # (compiled cases: their memory would cost a second compile; the eager one is measured)
            if (memory == "auto" and not quick or str(memory).lower() == "true") and "seconds" in c and not c.get("compile"):
                try:
                    c["peak_bytes"] = peak_memory(c, dev, dt)
                except RuntimeError as e:
                    c["memory_error"] = str(e)
        add_ratios(group)
        for c in group:
            if "seconds" in c:
                mem = f"{c['peak_bytes'] / 2**20:8.1f} MiB" if c.get("peak_bytes") is not None else ""
                print(f"  {label} {describe(c)} {c['seconds'] * 1e3:10.1f} ms  x{c.get('time_vs_softmax_sdpa', math.nan):5.2f}"
                      f"  {mem}", flush=True)
        results += group
        save(path, results, dev, dt, t_start)  # after every group: an interrupted run keeps what it measured
    print()
    print(table(results))
    print(f"\nwrote {path}.json ({time.time() - t_start:.0f} s)")


def save(path, results, dev, dt, t_start):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "device": dev, "dtype": dt, "torch": torch.__version__,
            "machine": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else None, "repeats": repeats,
            "attn_shape": [attn_batch, attn_heads, "T", head_dim], "wall_s": round(time.time() - t_start, 1)}
    tmp = path + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    os.replace(tmp, path + ".json")
    with open(path + ".md", "w") as f:
        f.write(f"`{meta['command']}` on {dev} ({dt}, torch {meta['torch']}, {meta['cpu_threads']} threads)\n\n")
        f.write(table(results) + "\n")


if __name__ == "__main__":
    configure(globals())
    main()
