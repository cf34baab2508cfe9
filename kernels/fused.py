"""
The `triton` backend: a spec -> the fused Triton kernels of triton_attn.py (stage 1 softplus for LSSA, exp for
softmax-type variants, with the re-weighting, the forget gate, ALiBi and sliding windows; stick-breaking, both
conventions; in FlashAttention-style tiles, forward and backward, no T x T tensor). A kernel that fails to compile
or launch falls back to the math backend inside the op (triton_attn._fwd_op).

Precision: the kernels accumulate in fp32. q and k arrive from model.prepare in fp32 (QK-norm and the row scale
applied); the dots take them in the dtype kernels.dots_dtype picks (GPTConfig.attn_dots): under bf16 / fp16
autocast, v's 16-bit dtype (tensor cores, wgmma on sm_90: the precision of softmax through FlashAttention), and
fp32 (tf32x3, near-fp32: triton_attn.FP32_DOT) otherwise. The precision study behind the choice for the
re-weighting, whose p-th power amplifies a score's error ~p-fold, is in docs/backends.md."""

import torch

from kernels import triton_attn as K  # ImportError where triton is missing: kernels.why_not reports it

# variant -> the kernels' kind (stage 1, or the stick)
KERNEL_KIND = {"lssa": "softplus", "softmax": "exp", "ssmax": "exp", "ssmax_learn": "exp", "stickbreak": "stickbreak",
               "stickbreak_self": "stickbreak_self"}


def supports(spec, q, needs_grad):
    kind = KERNEL_KIND.get(spec.kind)
    if kind is None:
        return f"backend 'triton' computes {', '.join(KERNEL_KIND)} only"
    if spec.variant.bias is not None and not spec.alibi:
        return "backend 'triton' adds ALiBi's bias only, not another score bias"
    if kind in K.STICK and (spec.alibi or spec.gate or spec.window):
        return (f"backend 'triton' computes {spec.kind} without ALiBi, a forget gate or a window (the spec asks for "
                f"alibi={spec.alibi}, gate={spec.gate}, window={spec.window})")
    return K.supports(q, q, q, kind, spec.reweight_p, spec.gate, spec.alibi, spec.window)


def attend(q, k, v, spec, pos_offset, *, chunk=256, needs_grad=False, dots=torch.float32, gate=None):
    """dots: the dtype of the q . k dots (kernels.dots_dtype). Triton's interpreter (CPU) has no bf16: there the
    dots stay fp32, on the values model.prepare already rounded (the same products). The kernels add ALiBi's bias
    from the spec's per-head slopes and mask the spec's window; the window's N_i is already in q (model.prepare)
    and in the re-weighting's N (the kernels' min(P + 1, W): spec.row_n)."""
    if q.device.type != "cuda" and dots == torch.bfloat16:
        dots = torch.float32
    return K.triton_attention(q, k, v, pos_offset, spec.reweight_p, KERNEL_KIND[spec.kind], spec.exempt_rows, dots,
                              gate, alibi=spec.alibi_slopes(q.shape[1], q.device), window=spec.window)
