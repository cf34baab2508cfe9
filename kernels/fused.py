"""
The `triton` backend: a spec -> the fused Triton kernels of triton_attn.py (stage 1 softplus for LSSA, exp for
softmax-type variants, and the re-weighting, in FlashAttention-style tiles; forward and backward, O(T) memory).
A kernel that fails to compile or launch falls back to the math backend inside the op (triton_attn._fwd_op).

Precision: the kernels accumulate in fp32. q and k arrive from model.prepare in fp32 (QK-norm and the row scale
applied). Without re-weighting, under bf16/fp16 autocast (v in 16 bits), q and k go to the kernel in v's dtype
(tensor-core dots, the same precision as softmax through FlashAttention). With re-weighting they stay fp32: the
p-th power amplifies a bf16 cosine's ~4e-3 error ~p-fold, so the q.k dots run as fp32 (triton_attn.FP32_DOT).
"""

import torch

from kernels import triton_attn as K  # ImportError where triton is missing: kernels.why_not reports it

KERNEL_KIND = {"lssa": "softplus", "softmax": "exp", "ssmax": "exp", "ssmax_learn": "exp"}  # variant -> stage 1


def supports(spec, q, needs_grad):
    kind = KERNEL_KIND.get(spec.kind)
    if kind is None or spec.variant.bias is not None:
        return f"backend 'triton' computes {', '.join(KERNEL_KIND)} (without a score bias, e.g. ALiBi) only"
    return K.supports(q, q, q, kind, spec.reweight_p)


def attend(q, k, v, spec, pos_offset, *, chunk=256, needs_grad=False):
    if spec.reweight_p == 0 and v.dtype in (torch.bfloat16, torch.float16):
        q, k = q.to(v.dtype), k.to(v.dtype)
    return K.triton_attention(q, k, v, pos_offset, spec.reweight_p, KERNEL_KIND[spec.kind])
