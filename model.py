"""
The whole GPT in one file, with a switchable attention normalisation.

Attention is written in the paper's two stages (arXiv 2501.13428, see ../shared/docs/PAPER.md):
  1. normalisation: turn the scores of query row i into weights over the keys j <= i
     (softmax, LSSA = length-scaled softplus, sigmoid, ReLU, SSMax)
  2. sharpening (optional, `reweight_p` > 0): A'_ij ~ ReLU(N_i * A_ij - O_i) ** p   (LSSAR = LSSA + this)
Each variant below is a few lines: whether it uses QK-norm, the per-row scale of q.k, the log of its
weight as a function of the scaled score, and whether rows are l1-normalised. `causal_attention` is the
one entry point every path uses (training, evaluation, KV-cache decoding); backends only decide how the
same formula is computed.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# attention variants: one source of truth


def _inv_sqrt_d(n, d):
    return torch.full_like(n, 1.0 / math.sqrt(d))


def _log_d_log_n(n, d):
    # LSSA / SSMax: log(d) replaces 1/sqrt(d), log(N_i) keeps the entropy of a row from growing with length
    return math.log(d) * torch.log(n)


def log_softplus(s):
    # log(softplus(s)) without -inf: softplus(s) underflows for s << 0, where log(softplus(s)) = s + O(e^s).
    # The clamp keeps the unused branch finite so its gradient is not NaN.
    # (threshold 40, not the default 20: softplus(s) = s is off by e^-s, 2e-9 at s = 20, 4e-18 at 40)
    return torch.where(s < -30.0, s, torch.log(F.softplus(s.clamp_min(-30.0), threshold=40.0)))


def _log_relu(s):
    # log(ReLU(s)); -inf (weight exactly 0) for s <= 0, with a finite unused branch for clean gradients
    return torch.where(s > 0, torch.log(s.clamp_min(1e-30)), float("-inf"))


@dataclass(frozen=True)
class Variant:
    qk_norm: bool   # l2-normalise q and k per head (q.k becomes a cosine)
    scale: object   # scale(N, d) -> multiplier of q.k for a query row with N visible keys
    logw: object    # logw(s, N) -> log of the (unnormalised) weight of scaled score s; None = identity (softmax)
    normalise: bool  # l1-normalise each row (sum_j weights = 1)
    weight: object = None  # optional weight(s, N) = exp(logw(s, N)) computed directly (the math backend's fast path)


ATTN_VARIANTS = {
    "softmax": Variant(False, _inv_sqrt_d, None, True),
    "lssa": Variant(True, _log_d_log_n, lambda s, n: log_softplus(s), True, lambda s, n: F.softplus(s, threshold=40.0)),
    "ssmax": Variant(True, _log_d_log_n, None, True),
    "sigmoid": Variant(False, _inv_sqrt_d, lambda s, n: F.logsigmoid(s - torch.log(n)), False,
                       lambda s, n: torch.sigmoid(s - torch.log(n))),
    "relu": Variant(False, _inv_sqrt_d, lambda s, n: _log_relu(s) - torch.log(n), False, lambda s, n: torch.relu(s) / n),
}
ATTN_ALIASES = {"lssar": ("lssa", 15.0)}  # name -> (variant, default reweight_p)
ATTN_KINDS = sorted(ATTN_VARIANTS) + sorted(ATTN_ALIASES)
REWEIGHT_EXEMPT_ROWS = 3  # rows i = 0, 1, 2 use offset O_i = 0 "to avoid early instability"


def resolve_attn(attn, reweight_p=0.0):
    """Map (attn, reweight_p) to (variant name, p); validates both with errors that name the fix."""
    if attn in ATTN_ALIASES:
        attn, default_p = ATTN_ALIASES[attn]
        reweight_p = reweight_p or default_p
    if attn not in ATTN_VARIANTS:
        raise ValueError(f"unknown attn={attn!r}; choose one of {', '.join(ATTN_KINDS)}")
    reweight_p = float(reweight_p)
    if not reweight_p >= 0:
        raise ValueError(f"reweight_p must be >= 0 (0 turns re-weighting off), got {reweight_p}")
    if reweight_p > 0 and not ATTN_VARIANTS[attn].normalise:
        raise ValueError(f"reweight_p > 0 needs l1-normalised weights (softmax, lssa, ssmax); {attn} is unnormalised")
    return attn, reweight_p


# -----------------------------------------------------------------------------
# the attention function and its backends
#
#   sdpa  softmax and SSMax through F.scaled_dot_product_attention (flash / memory-efficient kernels)
#   math  every variant, exact, in chunks of (heads x query rows): O(chunk x T) memory in the forward AND the
#         backward (a custom autograd function recomputes each chunk past a budget), on any device; the reference
#   flex  torch.compile(flex_attention) with a score_mod returning the log-weights; normalised variants only
#   auto  the fastest exact one for the kind, device and whether gradients are needed (see _pick_backend)


def _row_n(pos_offset, Tq, like):
    # N_i = absolute position + 1 of each query row, shaped to broadcast over (B, H, Tq, Tk); the weights are
    # computed in fp32 at least (fp64 when the inputs are fp64), also under bf16 autocast
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.arange(pos_offset + 1, pos_offset + Tq + 1, device=like.device, dtype=dtype).view(Tq, 1)


CHUNK_ELEMENTS = 2**21  # score-matrix elements per chunk: measured fastest on CPU (fits in cache, no mmap churn)


def _chunk_rows(q, k, chunk):
    B, H, _, _ = q.shape
    return max(1, min(chunk, CHUNK_ELEMENTS // (B * H * k.shape[2])))


def _direct_ok(var, q, pos_offset):
    """Can the math backend use var.weight (e.g. softplus) instead of exp(logw - row max) for queries q (B, H, Tq, d)
    at pos_offset? Always for unnormalised kinds; for normalised ones only when no row can underflow to all zeros:
    QK-norm bounds |s| <= scale(N) with N at most pos_offset + Tq."""
    if var.weight is None:
        return False
    if not var.normalise:
        return True
    n_max = torch.tensor([[float(pos_offset + q.shape[2])]], dtype=torch.float64)
    bound = float(var.scale(n_max, q.shape[-1])) if var.qk_norm else math.inf
    return bound < (80.0 if q.dtype != torch.float64 else 700.0)  # softplus(-80) = 1.8e-35 > fp32 tiny


def _stage1(s, var, n, direct):
    """Weights up to a per-row factor (normalised kinds) or exactly (unnormalised); -inf scores give 0."""
    if direct:
        return var.weight(s, n)
    logw = s if var.logw is None else var.logw(s, n)
    m = logw.detach().amax(dim=-1, keepdim=True)
    return torch.exp(logw - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))


def _chunk_scores(q, k, var, n, first, c0):
    """Scaled scores of query rows c0 .. (absolute positions first ..) against the keys they can see, -inf on the
    causal triangle; returns (s, per-row scale)."""
    r = n.shape[0]
    scale = var.scale(n, q.shape[-1])
    s = (q[..., c0:c0 + r, :] * scale) @ k[..., :first + r, :].transpose(-2, -1)
    # keys before `first` are visible to every row of the chunk: only the last r keys form a causal triangle
    s[..., first:] += _causal_bias(r, s.dtype, s.device)
    return s, scale


_BIAS = {}


def _causal_bias(r, dtype, device):
    """(r, r) with -inf above the diagonal, 0 elsewhere: adding it is ~10x faster than masked_fill_ on a strided
    view (measured on CPU) and leaves the visible scores bit-identical."""
    key = (r, dtype, str(device))
    if key not in _BIAS:
        if len(_BIAS) > 64:
            _BIAS.clear()
        _BIAS[key] = torch.full((r, r), float("-inf"), dtype=dtype, device=device).triu_(1)
    return _BIAS[key]


def _powi(u, e, inplace=False):
    """u ** e; for a whole e up to 64 by repeated squaring (~3x faster than pow's exp(e log u) on CPU).
    inplace=True may overwrite u."""
    if e != int(e) or not 1 <= e <= 64:
        return u.pow_(e) if inplace else u.pow(e)
    e, out, sq = int(e), None, u
    while True:
        if e & 1:
            out = sq.clone() if out is None else out.mul_(sq)
        e >>= 1
        if not e:
            return out
        sq = sq.mul_(sq) if inplace else sq * sq


def _row_logsumexp(q, k, var, pos_offset, chunk=256):
    """log sum_j exp(logw_ij) of every query row (B, H, Tq), over the math backend's chunks (_plan)."""
    Tq = q.shape[2]
    n_all = _row_n(pos_offset, Tq, q)
    qf, kf = _flat(q), _flat(k)
    lse = torch.empty(qf.shape[:-1], dtype=q.dtype, device=q.device)
    plan, rows = _plan(qf.shape[0], Tq, kf.shape[1], chunk)
    for hs, c0 in plan:
        n = n_all[c0:c0 + rows]
        s, _ = _chunk_scores(qf[hs], kf[hs], var, n, pos_offset + c0, c0)
        lse[hs, c0:c0 + n.shape[0]] = torch.logsumexp(s if var.logw is None else var.logw(s, n), dim=-1)
    return lse.view(q.shape[:-1])


def _chunk(q, k, var, p, n_all, pos_offset, c0, rows, direct, grad=False):
    """Both stages for query rows c0 .. c0+rows-1 against the keys they can see (0 .. tk-1). Returns
    (tk, s, phi, u, st): the final weights are w = u * st['f'], with u = phi (no re-weighting) or
    u = ReLU(x / max_j x)^p, x = N_i phi_ij / S_i - O_i (re-weighting), and f a per-row factor (1, 1/S or 1/Z),
    so the row factors are applied to the small (rows x d) outputs, not to the (rows x T) weights.
    (x / max x)^p cannot overflow at p = 15 and leaves A' = R / sum R exact; a row with no x > 0 (exactly
    uniform A) gets weights 0 and so a zero output. With grad=True, phi carries the graph of stage 1 from s."""
    n = n_all[c0:c0 + rows]
    r = n.shape[0]
    first = pos_offset + c0
    s, scale = _chunk_scores(q, k, var, n, first, c0)
    if grad:
        s.requires_grad_(True)
    with torch.set_grad_enabled(grad):
        phi = _stage1(s, var, n, direct)
    u = phi.detach()
    st = {"scale": scale, "f": torch.ones_like(n)}
    if var.normalise:
        S = u.sum(dim=-1, keepdim=True)
        st["S"] = S
        st["f"] = 1.0 / S
        if p > 0:
            O = (torch.arange(first, first + r, device=s.device) >= REWEIGHT_EXEMPT_ROWS).to(n.dtype).view(r, 1)
            xm = u.amax(dim=-1, keepdim=True) * (n / S) - O  # max_j x_ij: x is increasing in phi_ij
            inv = torch.where(xm > 0, 1.0 / xm.clamp_min(torch.finfo(n.dtype).tiny), 0.0)
            st["a"] = a = (n / S) * inv
            if grad:  # keep phi and u^(p-1) for the backward
                u = torch.addcmul(-O * inv, u, a).clamp_min_(0.0)  # x / max x, then ReLU
                st["du"] = du = _powi(u.clone(), p - 1, inplace=True) if p > 1 else torch.where(u > 0, u.pow(p - 1), 0.0)
                u = u.mul_(du)  # u^p
            else:  # the same in place (phi is not needed again): fewer large allocations
                u = _powi(u.mul_(a).sub_(O * inv).clamp_min_(0.0), p, inplace=True)
            st["Z"] = Z = u.sum(dim=-1, keepdim=True)
            st["f"] = 1.0 / Z.clamp_min(torch.finfo(n.dtype).tiny)
    return first + r, s, phi, u, st


KEEP_ELEMENTS = 2**24  # the math backward reuses the forward's chunk tensors while they total <= this (64 MB fp32)


def _plan(BH, Tq, Tk, chunk):
    """The math backend's chunks over (batch x head, query rows), each with at most ~CHUNK_ELEMENTS scores: as many
    rows as `chunk`, a quarter of Tq and the budget allow, then as many heads as fit. Rows first: every chunk
    streams its heads' K and V once, so few rows per chunk at long T waste memory bandwidth (measured on CPU at
    T = 16384: all 12 heads x 10 rows per chunk took 3.9x SDPA's time for LSSA, one head x 128 rows 2.7x). At most
    a quarter of Tq: a chunk of r rows also computes the r x r / 2 masked scores above its diagonal, 1/4 more work
    than the causal triangle at r = Tq / 4 (the demo's train step: 0.92x softmax's tokens/s vs 0.76x at r = Tq)."""
    rows = max(1, min(chunk, max(16, -(-Tq // 4)), CHUNK_ELEMENTS // Tk))
    heads = max(1, min(BH, CHUNK_ELEMENTS // (rows * Tk)))
    return [(slice(h0, h0 + heads), c0) for h0 in range(0, BH, heads) for c0 in range(0, Tq, rows)], rows


def _flat(t):
    return t.reshape(-1, t.shape[-2], t.shape[-1])  # (B, H, T, d) -> (B*H, T, d)


def _math_forward(q, k, v, var, p, pos_offset, chunk, keep=None):
    """q, k, v (B, H, T, d) in the accumulation dtype (fp32 or fp64); returns the output in that dtype. With a
    list `keep`, the chunks are computed with stage 1's graph and appended to it for the backward."""
    Tq = q.shape[2]
    n_all = _row_n(pos_offset, Tq, q)
    direct = _direct_ok(var, q, pos_offset)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    out = torch.empty(qf.shape[:-1] + vf.shape[-1:], dtype=v.dtype, device=v.device)
    plan, rows = _plan(qf.shape[0], Tq, kf.shape[1], chunk)
    for hs, c0 in plan:
        ch = _chunk(qf[hs], kf[hs], var, p, n_all, pos_offset, c0, rows, direct, grad=keep is not None)
        tk, _, _, u, st = ch
        torch.mul(u @ vf[hs, :tk], st["f"], out=out[hs, c0:c0 + rows])
        if keep is not None:
            keep.append(ch)
    return out.view(q.shape[:-1] + v.shape[-1:])


class _MathAttention(torch.autograd.Function):
    """The math backend with a memory-lean backward: the backward applies the derivative of stage 2
    (normalisation, re-weighting) by hand and that of the elementwise stage 1 by autograd on each chunk.
    Long inputs save only q, k, v and the output and recompute each chunk's weights in the backward, so training
    memory is O(chunk x T) per layer, as in the forward; short ones (chunk tensors totalling <= KEEP_ELEMENTS)
    keep the forward's chunks instead: memory bounded by that constant, and measured ~10% faster per demo train
    step on CPU, where softplus alone costs as much as a matmul."""

    @staticmethod
    def forward(ctx, q, k, v, var, p, pos_offset, chunk):
        B, H, Tq, _ = q.shape
        per_row = B * H * k.shape[2] * (2 if p == 0 else 4)  # s and phi (+ R and u^(p-1) when re-weighting)
        ctx.kept = [] if Tq * per_row <= KEEP_ELEMENTS else None
        out = _math_forward(q, k, v, var, p, pos_offset, chunk, keep=ctx.kept)
        ctx.save_for_backward(q, k, v, out)
        ctx.args = (var, p, pos_offset, chunk)
        return out

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):
            return _MathAttention._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        q4, k4, v4, out = ctx.saved_tensors
        var, p, pos_offset, chunk = ctx.args
        Tq = q4.shape[2]
        n_all = _row_n(pos_offset, Tq, q4)
        direct = _direct_ok(var, q4, pos_offset)
        q, k, v = _flat(q4), _flat(k4), _flat(v4)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dout = _flat(dout.to(v.dtype))
        delta = (dout * _flat(out)).sum(dim=-1, keepdim=True)  # sum_j w_ij dL/dw_ij = dout_i . out_i (FlashAttention)
        kept, ctx.kept = ctx.kept, None
        plan, rows = _plan(q.shape[0], Tq, k.shape[1], chunk)
        for i, (hs, c0) in enumerate(plan):
            if kept:
                tk, s, phi, u, st = kept[i]
                kept[i] = None  # free each chunk as soon as it is used
            else:
                tk, s, phi, u, st = _chunk(q[hs], k[hs], var, p, n_all, pos_offset, c0, rows, direct, grad=True)
            sl = slice(c0, c0 + u.shape[-2])
            do = dout[hs, sl]
            dv[hs, :tk] += u.transpose(-2, -1) @ (do * st["f"])
            g = do @ v[hs, :tk].transpose(-2, -1)  # dL/dw
            if var.normalise:
                g.sub_(delta[hs, sl])  # dL/dw_ij - sum_j w_ij dL/dw_ij: the normalisation's derivative
                if p > 0:
                    # through w = R / Z, R = (x / max x)^p, x = N phi / S - O, then phi / S once more
                    g.mul_(st["du"])
                    ph = phi.detach()
                    m2 = (ph * g).sum(dim=-1, keepdim=True) / st["S"]
                    g.sub_(m2).mul_(p * st["a"] / st["Z"].clamp_min(torch.finfo(q.dtype).tiny))
                else:
                    g.mul_(st["f"])
            (ds,) = torch.autograd.grad(phi, s, g)
            dq[hs, sl] = (ds @ k[hs, :tk]) * st["scale"]
            dk[hs, :tk] += ds.transpose(-2, -1) @ (q[hs, sl] * st["scale"])
        shape = q4.shape[:2]
        return dq.view(q4.shape), dk.view(k4.shape), dv.view(*shape, *dv.shape[1:]), None, None, None, None


def _attn_math(q, k, v, var, p, pos_offset, chunk):
    """Exact reference backend; q, k arrive in fp32 (fp64) from _prepare; the output comes back in v's dtype."""
    with torch.autocast(q.device.type, enabled=False):
        vv = v.to(q.dtype)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, vv)):
            out = _MathAttention.apply(q, k, vv, var, p, pos_offset, chunk)
        else:
            out = _math_forward(q, k, vv, var, p, pos_offset, chunk)
    return out.to(v.dtype)


def _attn_sdpa(q, k, v, var, pos_offset):
    """Normalised, identity-logw variants (softmax, ssmax): the per-row scale folds into q, so
    F.scaled_dot_product_attention (flash / memory-efficient kernels) computes them exactly."""
    Tq, Tk, d = q.shape[2], k.shape[2], q.shape[3]
    n = _row_n(pos_offset, Tq, q)
    q, k = (q * var.scale(n, d)).to(v.dtype), k.to(v.dtype)  # SDPA wants one dtype (bf16 under autocast)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    mask = torch.arange(Tk, device=q.device).view(1, Tk) <= (n - 1).to(torch.long)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


_FLEX = {}


def _flex_attention():
    """torch.compile(flex_attention), built once per process; None where this torch has no flex attention.
    Static shapes: one compile per (kind, shape), i.e. per evaluated length, never per decoding step (auto sends
    Tq < Tk to math). dynamic=True measured fewer compiles on CPU but gave WRONG outputs (error ~1, or NaN) when two
    sizes coincide, e.g. T = head size = 8 (duck sizing gives them one symbol; torch 2.13), and its re-weighting
    pass failed to compile in a fresh process. Changing constants (pos_offset, p) are tensors, so they do not
    recompile."""
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


def _flex_block_mask(Tq, Tk, off):
    key = (Tq, Tk, int(off), str(off.device))
    if key not in _FLEX:  # block masks are cheap to keep and slow to build (2 s at T = 2048 on CPU)
        _FLEX[key] = _FLEX["mask"](lambda b, h, qi, kv: kv <= qi + off, None, None, Tq, Tk, device=off.device)
    return _FLEX[key]


def _attn_flex(q, k, v, var, p, pos_offset):
    """flex_attention normalises exp(score_mod) over each row, so a score_mod returning the log-weights computes
    phi / sum phi exactly. Re-weighting needs each row's log-sum log S_i first (from _row_logsumexp, chunked and
    exact; flex on CPU cannot return it); pass 2 then scores p * log(N_i phi_ij / S_i - O_i), which flex turns
    into R_ij / sum_j R_ij. Runs in fp32: the p-th power amplifies score errors ~p-fold."""
    flex = _flex_attention()
    Tq, Tk = q.shape[2], k.shape[2]
    if q.device.type == "cpu":
        # pad both lengths to multiples of 128: compiled CPU flex gave wrong rows for some small shapes in torch
        # 2.13 (e.g. T = 8 with batch x heads >= 8: errors ~1 or NaN); padded keys sit after every real query's
        # position, so the causal mask hides them, and padded query rows are dropped. Also buckets compiles.
        pq, pk = -Tq % 128, -Tk % 128
        q, k, v = F.pad(q, (0, 0, 0, pq)), F.pad(k, (0, 0, 0, pk)), F.pad(v, (0, 0, 0, pk))
        return _attn_flex_exact(flex, q, k, v, var, p, pos_offset, Tq, Tk)[:, :, :Tq]
    return _attn_flex_exact(flex, q, k, v, var, p, pos_offset, Tq, Tk)


def _attn_flex_exact(flex, q, k, v, var, p, pos_offset, Tq, Tk):
    """_attn_flex on q, k, v that may carry padding beyond the real Tq queries and Tk keys."""
    d, dtype = q.shape[-1], q.dtype
    off = torch.tensor(pos_offset, device=q.device)
    pp = torch.tensor(p, dtype=dtype, device=q.device)
    bm = _flex_block_mask(q.shape[2], k.shape[2], off)

    def logw(score, qi):
        n = (qi + off + 1).to(dtype)
        s = score * var.scale(n, d)
        return n, (s if var.logw is None else var.logw(s, n))

    def mod1(score, b, h, qi, kv):
        return logw(score, qi)[1]

    with torch.autocast(q.device.type, enabled=False):
        vv = v.to(dtype)
        if p == 0:
            return flex(q, k, vv, score_mod=mod1, block_mask=bm, scale=1.0).to(v.dtype)
        qr, kr = q[:, :, :Tq], k[:, :, :Tk]
        lse = _row_logsumexp(qr, kr, var, pos_offset)
        lse = F.pad(lse, (0, q.shape[2] - Tq))  # padded query rows: any finite value

        def mod2(score, b, h, qi, kv):
            n, lw = logw(score, qi)
            x = n * torch.exp(lw - lse[b, h, qi]) - (qi + off >= REWEIGHT_EXEMPT_ROWS).to(dtype)
            return torch.where(x > 0, pp * torch.log(x.clamp_min(torch.finfo(dtype).tiny)), float("-inf"))

        return flex(q, k, vv, score_mod=mod2, block_mask=bm, scale=1.0).to(v.dtype)


ATTN_BACKENDS = ("auto", "math", "sdpa", "flex")


def _prepare(q, k, attn, reweight_p, pos_offset):
    """Validate the call and apply QK-norm; returns (q, k, variant, p, pos_offset)."""
    name, p = resolve_attn(attn, reweight_p)
    var = ATTN_VARIANTS[name]
    Tq, Tk = q.shape[2], k.shape[2]
    pos_offset = Tk - Tq if pos_offset is None else int(pos_offset)
    if pos_offset < 0 or pos_offset + Tq > Tk:
        raise ValueError(f"pos_offset={pos_offset} with Tq={Tq} needs 0 <= pos_offset <= Tk - Tq = {Tk - Tq}")
    # scores in fp32 at least (fp64 for fp64 inputs), also under bf16 autocast: the p-th power of the re-weighting
    # amplifies score errors ~p-fold, and a bf16 cosine is off by ~4e-3, i.e. ~0.1 in a score scaled by log(d)log(N)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(acc), k.to(acc)
    if var.qk_norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return q, k, var, p, pos_offset


def _why_not(backend, var, p, q, needs_grad):
    """None if `backend` computes this call exactly, else the one-line reason."""
    if backend == "sdpa" and not (var.logw is None and var.normalise and p == 0):
        return "backend 'sdpa' computes softmax-type attention (softmax, ssmax) without re-weighting only"
    if backend == "flex":
        if _flex_attention() is None:
            return "this torch has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
        if not var.normalise:
            return "backend 'flex' normalises every row; sigmoid and relu attention are unnormalised"
        if needs_grad and q.device.type != "cuda":
            return f"flex_attention has no backward on {q.device.type} in this torch; train with 'math' or 'auto'"
        if q.dtype == torch.float64 and q.device.type == "cpu":
            return "compiled flex_attention on CPU computes float32 / bfloat16 only, not float64"
    return None


def _pick_backend(var, p, q, needs_grad, full=True):
    """auto: sdpa where exact (fastest everywhere); on CUDA flex (fused, O(T) memory) for the other normalised
    kinds in full passes (`full`: Tq = Tk; decoding stays on math, no compile per generated token), except
    LSSAR's training pass (its gradient through the captured row sums is unverified there); math otherwise.
    On CPU math is faster than compiled flex (bench.py at T = 16384: LSSA 2.20x vs 2.98x SDPA's time)."""
    if _why_not("sdpa", var, p, q, needs_grad) is None:
        return "sdpa"
    if q.device.type == "cuda" and full and _why_not("flex", var, p, q, needs_grad) is None and not (needs_grad and p > 0):
        return "flex"
    return "math"


def causal_attention(q, k, v, attn, reweight_p=0.0, pos_offset=None, backend="auto", chunk=256):
    """Causal attention of the last Tq positions over Tk keys.

    q: (B, H, Tq, d), k, v: (B, H, Tk, d), after RoPE. Key j sits at absolute position j; query t at
    pos_offset + t (default Tk - Tq: the queries are the last Tq positions), and sees keys j <= its position;
    N = its position + 1. The same call serves a full forward (Tq = Tk) and KV-cache decoding (Tq < Tk).
    """
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    q, k, var, p, pos_offset = _prepare(q, k, attn, reweight_p, pos_offset)
    if backend == "auto":
        backend = _pick_backend(var, p, q, needs_grad, full=q.shape[2] == k.shape[2])
    why = _why_not(backend, var, p, q, needs_grad)
    if why:
        raise NotImplementedError(f"{why} (asked for {attn} with reweight_p={p}); use backend 'math' or 'auto'")
    if backend == "sdpa":
        return _attn_sdpa(q, k, v, var, pos_offset)
    if backend == "flex":  # (flex refuses inputs that require grad on CPU, even under no_grad: none is needed here)
        detach = not needs_grad
        return _attn_flex(*((t.detach() if detach else t) for t in (q, k, v)), var, p, pos_offset)
    return _attn_math(q, k, v, var, p, pos_offset, chunk)


@torch.no_grad()
def attention_weights(q, k, attn, reweight_p=0.0, pos_offset=None, chunk=256):
    """The weights causal_attention uses (after both stages), chunk by chunk, for diagnostics: yields
    (first query row, w) with w of shape (B, H, rows, keys seen by the chunk); never a full T x T matrix."""
    q, k, var, p, pos_offset = _prepare(q, k, attn, reweight_p, pos_offset)
    rows = _chunk_rows(q, k, chunk)
    n_all = _row_n(pos_offset, q.shape[2], q)
    direct = _direct_ok(var, q, pos_offset)
    for c0 in range(0, q.shape[2], rows):
        with torch.autocast(q.device.type, enabled=False):  # per chunk: the caller's autocast state stays its own
            _, _, _, u, st = _chunk(q, k, var, p, n_all, pos_offset, c0, rows, direct)
            w = u * st["f"]
        yield c0, w


# -----------------------------------------------------------------------------
# the model


def rope_cos_sin(T, d, base, device, offset=0):
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    t = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, d/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x, cos, sin):
    # rotate pairs (x1_i, x2_i) of the two halves of each head by position-dependent angles
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


@dataclass
class GPTConfig:
    block_size: int = 1024      # training context; rope/none models may be run longer, learned ones may not
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attn: str = "softmax"       # softmax | lssa | lssar | sigmoid | relu | ssmax
    reweight_p: float = 0.0     # > 0: re-weighting stage with this power (LSSAR: attn='lssa', reweight_p=15)
    pos: str = "rope"           # rope | learned | none
    rope_base: float = 10000.0
    attn_backend: str = "auto"  # auto | math | sdpa | flex (see causal_attention)
    attn_chunk: int = 256       # query rows per chunk in the math backend (memory O(chunk x T))

    def __post_init__(self):
        resolve_attn(self.attn, self.reweight_p)  # fail at construction, not at the first forward
        if self.pos not in ("rope", "learned", "none"):
            raise ValueError(f"unknown pos={self.pos!r}; choose rope, learned or none")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("RoPE needs an even head size (n_embd / n_head)")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"unknown attn_backend={self.attn_backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.config = config

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.shape
        cfg = self.config
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # cache: dict holding this layer's past k, v (after RoPE)
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = causal_attention(q, k, v, cfg.attn, cfg.reweight_p, backend=cfg.attn_backend, chunk=cfg.attn_chunk)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache=None, reduction="mean"):
        """idx (B, T) -> logits (B, T, V) and, with targets, the cross-entropy loss.
        cache: list of per-layer dicts from new_cache(); idx then holds the tokens after the cached ones."""
        B, T = idx.shape
        offset = 0 if not cache or "k" not in cache[0] else cache[0]["k"].shape[2]
        cfg = self.config
        if cfg.pos == "learned" and offset + T > cfg.block_size:
            raise ValueError(f"learned position embeddings stop at block_size={cfg.block_size}, asked for "
                             f"{offset + T} tokens; use a pos='rope' or pos='none' model to go longer")
        x = self.transformer.wte(idx)
        rope = None
        if cfg.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(offset, offset + T, device=idx.device))
        elif cfg.pos == "rope":
            rope = rope_cos_sin(T, cfg.n_embd // cfg.n_head, cfg.rope_base, idx.device, offset)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, None if cache is None else cache[i])
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1, reduction=reduction)
        return logits, loss

    def new_cache(self):
        return [dict() for _ in range(self.config.n_layer)]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]  # matmuls and embeddings decay; biases and norms do not
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        extra = dict(fused=True) if device_type == "cuda" else dict()
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens after idx (B, T) with a KV cache: each step feeds one token and the
        attention sees its absolute position, so the logits equal those of a full forward pass.
        rope/none models keep the whole context (that is the point of length extrapolation); learned-position
        models crop to the last block_size tokens (and rebuild the cache) like nanoGPT."""
        cache, bs = self.new_cache(), self.config.block_size
        for _ in range(max_new_tokens):
            if self.config.pos == "learned" and idx.size(1) > bs:
                cache, ctx = self.new_cache(), idx[:, -bs:]  # past the learned table: recompute on the last bs
            else:
                ctx = idx[:, (cache[0]["k"].shape[2] if "k" in cache[0] else 0):]  # only the tokens not cached yet
            logits, _ = self(ctx, cache=cache)
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
