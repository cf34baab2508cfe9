"""The `sdpa` backend: softmax-type variants (exp weights, l1-normalised, no bias) without re-weighting, through
F.scaled_dot_product_attention (flash / memory-efficient kernels). model.prepare already folded the per-row
scale into q (SSMax's log(d) log(N_i) too), so SDPA runs with scale=1 and computes them exactly."""

import torch
import torch.nn.functional as F


def supports(spec, q, needs_grad):
    var = spec.variant
    if not (var.logw is None and var.normalise and var.bias is None and spec.reweight_p == 0 and not spec.gate):
        return ("backend 'sdpa' computes softmax-type attention (exp weights, normalised, no bias or forget gate) "
                "without re-weighting only")
    return None


def attend(q, k, v, spec, pos_offset, *, chunk=256, needs_grad=False, gate=None):
    """A window is a boolean (Tq, Tk) mask: exact, but SDPA then computes every score (O(T^2), and on CPU its
    math kernel stores them); kernels.pick prefers the backends that skip the hidden blocks."""
    Tq, Tk = q.shape[2], k.shape[2]
    q, k = q.to(v.dtype), k.to(v.dtype)  # SDPA wants one dtype (bf16 under autocast)
    if Tq == Tk and not spec.window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    pos = torch.arange(pos_offset, pos_offset + Tq, device=q.device).view(Tq, 1)
    keys = torch.arange(Tk, device=q.device).view(1, Tk)
    mask = (keys <= pos) & (keys > pos - spec.window) if spec.window else keys <= pos
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
