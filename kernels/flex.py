"""
The `flex` backend: normalised variants through torch.compile(flex_attention), which normalises exp(score_mod)
over each row; a score_mod returning the log-weights therefore computes phi / sum phi exactly. Re-weighting needs
each row's log-sum log S_i first (chunked.row_logsumexp, exact; flex on CPU cannot return it); pass 2 then scores
p * log(x_ij), x_ij = N_i phi_ij / S_i - O_i (the spec's reweight_arg), which flex turns into R_ij / sum_j R_ij.
Runs in fp32: the p-th power amplifies score errors ~p-fold.

Static shapes: one compile per (kind, shape), i.e. per evaluated length, never per decoding step (auto sends
Tq < Tk to math). dynamic=True measured fewer compiles on CPU but gave WRONG outputs (error ~1, or NaN) when two
sizes coincide, e.g. T = head size = 8 (duck sizing gives them one symbol; torch 2.13), and its re-weighting
pass failed to compile in a fresh process. Changing constants (pos_offset, p) are tensors, so they do not
recompile.
"""

import torch
import torch.nn.functional as F

from kernels.chunked import row_logsumexp

_FLEX = {}


def flex_attention():
    """torch.compile(flex_attention), built once per process; None where this torch has no flex attention."""
    if "fn" not in _FLEX:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
            _FLEX["mask"] = create_block_mask
            # each kind's score_mod at each shape is its own graph: past dynamo's default of 8 compiles per code
            # object flex SILENTLY falls back to an unfused O(T^2)-memory implementation
            cfg = torch._dynamo.config
            cfg.cache_size_limit = max(cfg.cache_size_limit, 256)
            cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 1024)
        except ImportError:
            _FLEX["fn"] = None
    return _FLEX["fn"]


def supports(spec, q, needs_grad):
    if flex_attention() is None:
        return "this torch has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
    if not spec.variant.normalise:
        return "backend 'flex' normalises every row; unnormalised variants (sigmoid, relu, stickbreak) need 'math'"
    if needs_grad and spec.gate:
        return ("flex's gradient of the captured forget-gate tensor is unverified (torch has no flex backward on CPU; "
                "on CUDA it is not checked against the oracle: docs/backends.md); train a gated model with 'math' or "
                "'triton'")
    if needs_grad and q.device.type != "cuda":
        return f"flex_attention has no backward on {q.device.type} in this torch; train with 'math' or 'auto'"
    if q.dtype == torch.float64 and q.device.type == "cpu":
        return "compiled flex_attention on CPU computes float32 / bfloat16 only, not float64"
    return None


def _block_mask(Tq, Tk, pos_offset, device, window=0):
    """Causal (and under a window, banded) block mask: flex skips the blocks no query of a tile sees."""
    key = (Tq, Tk, pos_offset, str(device), window)
    if key not in _FLEX:  # block masks are cheap to keep and slow to build (2 s at T = 2048 on CPU)
        off = torch.tensor(pos_offset, device=device)
        if window:
            def visible(b, h, qi, kv):
                return (kv <= qi + off) & (kv > qi + off - window)
        else:
            def visible(b, h, qi, kv):
                return kv <= qi + off
        _FLEX[key] = _FLEX["mask"](visible, None, None, Tq, Tk, device=device)
    return _FLEX[key]


def attend(q, k, v, spec, pos_offset, *, chunk=256, needs_grad=False, gate=None):
    """(flex refuses inputs that require grad on CPU, even under no_grad: none is needed when no grad is)"""
    if not needs_grad:
        q, k, v = q.detach(), k.detach(), v.detach()
        gate = None if gate is None else gate.detach()
    Tq, Tk = q.shape[2], k.shape[2]
    if q.device.type == "cpu":
        # pad both lengths to multiples of 128: compiled CPU flex gave wrong rows for some small shapes in torch
        # 2.13 (e.g. T = 8 with batch x heads >= 8: errors ~1 or NaN); padded keys sit after every real query's
        # position, so the causal mask hides them, and padded query rows are dropped. Also buckets compiles.
        pq, pk = -Tq % 128, -Tk % 128
        q, k, v = F.pad(q, (0, 0, 0, pq)), F.pad(k, (0, 0, 0, pk)), F.pad(v, (0, 0, 0, pk))
        gate = None if gate is None else F.pad(gate, (0, max(pk, pos_offset + Tq + pq - Tk)))
        return _attend_padded(q, k, v, spec, pos_offset, Tq, Tk, gate)[:, :, :Tq]
    return _attend_padded(q, k, v, spec, pos_offset, Tq, Tk, gate)


def _attend_padded(q, k, v, spec, pos_offset, Tq, Tk, gate=None):
    """attend on q, k, v that may carry padding beyond the real Tq queries and Tk keys. gate: c (B, H, >= Tk),
    indexed by absolute position (a padded query row's position may pass Tk: c is padded to cover it)."""
    flex, var, dtype, H = flex_attention(), spec.variant, q.dtype, q.shape[1]
    off = torch.tensor(pos_offset, device=q.device)
    pp = torch.tensor(spec.reweight_p, dtype=dtype, device=q.device)
    bm = _block_mask(q.shape[2], k.shape[2], pos_offset, q.device, spec.window)

    def logw(score, b, h, qi, kv):
        n = (qi + off + 1).to(dtype)
        if spec.window:  # N_i: the keys the row sees
            n = n.clamp_max(spec.window)
        s = score if var.bias is None else score + var.bias(qi + off, kv, h, H)
        if gate is not None:
            s = s + (gate[b, h, qi + off] - gate[b, h, kv]).to(dtype)
        return n, (s if var.logw is None else var.logw(s, n))

    def mod1(score, b, h, qi, kv):
        return logw(score, b, h, qi, kv)[1]

    with torch.autocast(q.device.type, enabled=False):
        vv = v.to(dtype)
        if spec.reweight_p == 0:
            return flex(q, k, vv, score_mod=mod1, block_mask=bm, scale=1.0).to(v.dtype)
        lse = row_logsumexp(q[:, :, :Tq], k[:, :, :Tk], spec, pos_offset, gate=None if gate is None else gate[..., :Tk])
        lse = F.pad(lse, (0, q.shape[2] - Tq))  # padded query rows: any finite value

        def mod2(score, b, h, qi, kv):
            n, lw = logw(score, b, h, qi, kv)
            x = spec.reweight_arg(torch.exp(lw - lse[b, h, qi]), n, qi + off)
            return torch.where(x > 0, pp * torch.log(x.clamp_min(torch.finfo(dtype).tiny)), float("-inf"))

        return flex(q, k, vv, score_mod=mod2, block_mask=bm, scale=1.0).to(v.dtype)
