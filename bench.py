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

from common import parse_list, pick_device
from configurator import configure
from kernels import BACKENDS
from model import GPT, AttnSpec, GPTConfig, attn_names, causal_attention

# -----------------------------------------------------------------------------
kinds = ",".join(attn_names())  # every attention of model.py's registry
backends = "sdpa,math,flex,triton"
lengths = LENGTHS = "64,256,1024,4096,16384"
grad_max_len = 4096      # forward+backward of attention alone up to this length
attn_batch = 1
attn_heads = 12          # one GPT-2-small layer: 12 heads of 64
head_dim = 64
eval_kinds = "softmax,lssa,lssar"
eval_lengths = "16384"   # GPT-2-small forward, batch 1 ("" to skip)
train_kinds = "softmax,lssa,lssar"
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
# -----------------------------------------------------------------------------


def _sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(dev, dt):
    return torch.autocast("cuda" if dev.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=dt == "bfloat16")


DEMO = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=65)  # config/train_shakespeare_char.py
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)  # config/train_gpt2_fineweb.py


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
        spec = AttnSpec.of(kind)

        def run():
            with _autocast(dev, dt):
                if grad:
                    y = causal_attention(q, k, v, spec, backend=case["backend"])
                    y.backward(go)
                    q.grad = k.grad = v.grad = None
                else:
                    with torch.no_grad():
                        causal_attention(q, k, v, spec, backend=case["backend"])
        return run
    if case.get("backend") == "triton" and not dev.startswith("cuda"):
        raise NotImplementedError("interpreter, not timed")
    size = GPT2 if case["model"] == "gpt2" else DEMO
    model = GPT(GPTConfig(block_size=T, attn=kind, **size)).to(dev)
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
        if c["what"] != "attn":
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
            for kind in parse_list(kinds):
                for be in parse_list(backends):
                    cases.append(dict(what="attn", kind=kind, backend=be, T=T, grad=grad))
    if not quick:
        for T in parse_list(eval_lengths, int):
            cases += [dict(what="eval", model="gpt2", kind=k, T=T, batch=1) for k in parse_list(eval_kinds)]
    on_gpu = dev.startswith("cuda")
    compiled = [False, True] if train_compile.lower() == "true" or (train_compile == "auto" and on_gpu) else [False]
    cases += [dict(what="train", model="demo", kind=k, T=train_len, batch=train_batch, compile=c)
              for c in compiled for k in parse_list(train_kinds)]
    if not quick and (gpt2_train.lower() == "true" or (gpt2_train == "auto" and on_gpu)):
        cases += [dict(what="train", model="gpt2", kind=k, T=1024, batch=8 if on_gpu else 1, compile=c)
                  for c in compiled for k in parse_list(train_kinds)]
    return cases


def on_signal(signum, frame):
    # SIGTERM / SIGINT: stop as an exception, so that subprocess.run kills a running memory measurement (it does
    # for any exception) and what was measured so far stays saved (after every group)
    raise SystemExit(128 + signum)


def main():
    signal.signal(signal.SIGTERM, on_signal)
    dev = pick_device(device)
    dt = dtype if dtype != "auto" else ("bfloat16" if dev.startswith("cuda") else "float32")
    if mem_case:  # subprocess mode
        case = json.loads(mem_case)
        warm = case.get("backend") == "flex" or case["what"] == "train"  # compiles / optimizer state come first
        print(json.dumps({"peak_bytes": peak_memory_here(build(case, dev, dt), dev, warm)}))
        return
    for key, allowed in (("kinds", attn_names()), ("eval_kinds", attn_names()), ("train_kinds", attn_names()),
                         ("backends", BACKENDS)):
        bad = [x for x in parse_list(globals()[key]) if x not in allowed]
        if bad:
            raise SystemExit(f"bench error: unknown {key} {', '.join(bad)}; choose from {', '.join(allowed)}")
    path = out or os.path.join("results", "bench", f"bench_{dev.split(':')[0]}{'_quick' if quick else ''}")
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
