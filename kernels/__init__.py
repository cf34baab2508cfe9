"""
How attention is computed. Every backend receives the canonical spec (model.AttnSpec) and q, k, v as
model.prepare leaves them (QK-norm and the per-row scale applied, fp32 at least), so the score is plain q . k,
and computes the same formula; model.py holds the formulas and a plain reference implementation.

    math    every variant, any p, forward and backward, any device (chunked.py: chunks of heads x query rows,
            O(chunk x T) memory, a hand-written backward for stage 2)
    sdpa    softmax-type variants (exp weights, normalised, no bias) without re-weighting, through
            F.scaled_dot_product_attention (flash / memory-efficient kernels) (sdpa.py)
    flex    normalised variants through torch.compile(flex_attention), re-weighting as a second pass (flex.py)
    triton  fused FlashAttention-style kernels for LSSA / LSSAR (fused.py -> triton_attn.py); CUDA, or Triton's
            interpreter on CPU (TRITON_INTERPRET=1: exact and slow, for tests)
    auto    the fastest exact one for the spec, the device and whether gradients are needed (pick)

A backend module has supports(spec, q, needs_grad) -> None or the one-line reason it cannot compute a call
exactly, and attend(q, k, v, spec, pos_offset, chunk, needs_grad, gate) -> output in v's dtype (gate: the forget
gate's c (B, H, Tk) when spec.gate, whose gradient the backend returns too). Modules are imported on first use
(flex compiles, Triton may be missing).
"""

BACKENDS = ("auto", "math", "sdpa", "flex", "triton")

# The spec's class (model.AttnSpec), handed over by model.py when it is imported: the arrow between the two files
# points one way (model.py -> kernels/). A backend computes with the methods of the spec it is given (stage1,
# reweight, reweight_grad, reweight_arg, exempt_rows, row_n, variant); custom ops, which take strings, rebuild a
# spec from its key with the class; the Triton op's fallback builds the plain softplus / exp spec it computes.
_SPEC = {}


def use_spec(cls):
    _SPEC["cls"] = cls


def spec_from_key(key):
    """The spec of AttnSpec.key() (what a custom op receives)."""
    return _SPEC["cls"].from_key(key)


def make_spec(attn, reweight_p=0.0, **kw):
    return _SPEC["cls"].of(attn, reweight_p, **kw)


def backend_module(name):
    if name == "math":
        from kernels import chunked as m
    elif name == "sdpa":
        from kernels import sdpa as m
    elif name == "flex":
        from kernels import flex as m
    else:
        from kernels import fused as m
    return m


def why_not(backend, spec, q, needs_grad):
    """None if `backend` computes this call exactly, else the one-line reason."""
    if backend == "triton":
        try:
            m = backend_module("triton")
        except ImportError as e:
            return f"backend 'triton' needs the triton package ({e}); pip install 'triton>=3.2'"
    else:
        m = backend_module(backend)
    return m.supports(spec, q, needs_grad)


def pick(spec, q, needs_grad, full=True):
    """auto: sdpa where exact (fastest everywhere) without a window; on CUDA the fused Triton kernels for the kinds
    they cover, then flex (fused, O(T) memory) for other normalised kinds in full passes (`full`: Tq = Tk; decoding
    stays on math, no compile per generated token) except LSSAR-type training (flex's gradient through the captured
    row sums is unverified), then sdpa with a window's mask; math otherwise. On CPU math is faster than compiled
    flex (measured: docs/backends.md) and Triton runs only through its (slow) interpreter."""
    sdpa = why_not("sdpa", spec, q, needs_grad) is None
    if sdpa and not spec.window:
        return "sdpa"
    if q.device.type == "cuda":
        if why_not("triton", spec, q, needs_grad) is None:
            return "triton"
        if full and not (needs_grad and spec.reweight_p > 0) and why_not("flex", spec, q, needs_grad) is None:
            return "flex"
        if sdpa:  # a window as a mask: every score computed, but fused
            return "sdpa"
    return "math"  # (under a window on CPU: only the keys a chunk sees, O(T x window))


# The precision of the q . k dots (GPTConfig.attn_dots). auto: the backend's own choice; the Triton kernels then
# take q, k in v's 16-bit dtype under bf16 / fp16 autocast (tensor cores, wgmma on sm_90), with or without the
# re-weighting (the precision study in docs/backends.md: 16-bit dots changed the demo LSSAR's losses by less than
# the seed spread), and in fp32 otherwise. bf16 / fp16: q, k rounded to 16 bits after model.prepare, for every
# backend (round_dots): the Triton kernels' tensor-core inputs exactly, and on any other backend an emulation of
# them (fp32 products and sums of the rounded values).
DOTS = ("auto", "fp32", "bf16", "fp16")
LOG2E = 1.4426950408889634


def round_dots(q, k, dots):
    """q, k as the dots' 16-bit inputs would hold them (identity for auto / fp32). q is rounded as the Triton
    kernels round it, in base 2 (q log2(e)), so that the emulation and the kernels see the same scores."""
    if dots in ("auto", "fp32"):
        return q, k
    import torch
    dt = torch.bfloat16 if dots == "bf16" else torch.float16
    return (q * LOG2E).to(dt).to(q.dtype) / LOG2E, k.to(dt).to(k.dtype)


def dots_dtype(dots, v_dtype):
    """The dtype the Triton kernels take q, k in: explicit, or for auto v's dtype when it has 16 bits (autocast),
    else fp32."""
    import torch
    if dots == "auto":
        return v_dtype if v_dtype in (torch.bfloat16, torch.float16) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dots]


def attend(q, k, v, spec, pos_offset, *, backend="auto", chunk=256, needs_grad=False, dots="auto", gate=None):
    """gate: c (B, H, Tk) fp32 when spec.gate (model.causal_attention checks it)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(('reference', *BACKENDS))}")
    if backend == "auto":
        backend = pick(spec, q, needs_grad, full=q.shape[2] == k.shape[2])
    why = why_not(backend, spec, q, needs_grad)
    if why:
        raise NotImplementedError(f"{why} (asked for {spec.kind} with reweight_p={spec.reweight_p:g}); "
                                  "use backend 'math' or 'auto'")
    extra = dict(dots=dots_dtype(dots, v.dtype)) if backend == "triton" else {}
    return backend_module(backend).attend(q, k, v, spec, pos_offset, chunk=chunk, needs_grad=needs_grad, gate=gate,
                                          **extra)


def weights(q, k, spec, pos_offset, *, chunk=256, gate=None):
    """The final weights chunk by chunk (diagnostics): yields (first query position, w (B, H, rows, keys))."""
    from kernels import chunked
    yield from chunked.weights(q, k, spec, pos_offset, chunk=chunk, gate=gate)
