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
exactly, and attend(q, k, v, spec, pos_offset, chunk, needs_grad) -> output in v's dtype. Modules are imported
on first use (flex compiles, Triton may be missing).
"""

BACKENDS = ("auto", "math", "sdpa", "flex", "triton")


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
    """auto: sdpa where exact (fastest everywhere); on CUDA the fused Triton kernels for the kinds they cover, then
    flex (fused, O(T) memory) for other normalised kinds in full passes (`full`: Tq = Tk; decoding stays on math,
    no compile per generated token) except LSSAR-type training (flex's gradient through the captured row sums
    is unverified); math otherwise. On CPU math is faster than compiled flex (measured: docs/backends.md) and Triton
    runs only through its (slow) interpreter."""
    if why_not("sdpa", spec, q, needs_grad) is None:
        return "sdpa"
    if q.device.type == "cuda":
        if why_not("triton", spec, q, needs_grad) is None:
            return "triton"
        if full and not (needs_grad and spec.reweight_p > 0) and why_not("flex", spec, q, needs_grad) is None:
            return "flex"
    return "math"


def attend(q, k, v, spec, pos_offset, *, backend="auto", chunk=256, needs_grad=False):
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(('reference', *BACKENDS))}")
    if backend == "auto":
        backend = pick(spec, q, needs_grad, full=q.shape[2] == k.shape[2])
    why = why_not(backend, spec, q, needs_grad)
    if why:
        raise NotImplementedError(f"{why} (asked for {spec.kind} with reweight_p={spec.reweight_p:g}); "
                                  "use backend 'math' or 'auto'")
    return backend_module(backend).attend(q, k, v, spec, pos_offset, chunk=chunk, needs_grad=needs_grad)


def weights(q, k, spec, pos_offset, *, chunk=256):
    """The final weights chunk by chunk (diagnostics): yields (first query position, w (B, H, rows, keys))."""
    from kernels import chunked
    yield from chunked.weights(q, k, spec, pos_offset, chunk=chunk)
