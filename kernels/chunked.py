"""
The `math` backend: every variant, any re-weighting power, forward and backward, on any device, exact.

The scores are computed in chunks of (batch x head, query rows), each against only the keys its rows can see,
with at most ~CHUNK_ELEMENTS scores per chunk, so memory is O(chunk x T) in the forward AND the backward: the
backward saves only q, k, v and the output and recomputes each chunk (FlashAttention's recomputation idea,
without fusion). Stage 2's derivative is applied by hand (the spec's reweight_grad), stage 1's (elementwise, any
variant) by autograd on the chunk.

Forward and backward are torch.library custom ops under torch.compile (opaque calls: no graph break, nothing
traced inside; the spec reaches them as a string, AttnSpec.key) and an autograd Function in eager mode (below).
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

import kernels

CHUNK_ELEMENTS = 2**21  # score-matrix elements per chunk: measured fastest on CPU (fits in cache, no mmap churn)


def plan(BH, Tq, Tk, chunk, all_heads=False):
    """The chunks over (batch x head, query rows), each with at most ~CHUNK_ELEMENTS scores: as many rows as
    `chunk`, a quarter of Tq and the budget allow, then as many heads as fit (all of them with all_heads: the
    diagnostics' chunks are whole (B, H) blocks). Rows first: every chunk streams its heads' K and V once, so few
    rows per chunk at long T waste memory bandwidth (measured on CPU at T = 16384: all 12 heads x 10 rows per chunk
    took 3.9x SDPA's time for LSSA, one head x 128 rows 2.7x). At most a quarter of Tq: a chunk of r rows also
    computes the r x r / 2 masked scores above its diagonal, 1/4 more work than the causal triangle at r = Tq / 4
    (the demo's train step: 0.92x softmax's tokens/s vs 0.76x at r = Tq). Returns ([(head slice, first row)], rows)."""
    if all_heads:
        rows = max(1, min(chunk, CHUNK_ELEMENTS // (BH * Tk)))
        return [(slice(0, BH), c0) for c0 in range(0, Tq, rows)], rows
    rows = max(1, min(chunk, max(16, -(-Tq // 4)), CHUNK_ELEMENTS // Tk))
    heads = max(1, min(BH, CHUNK_ELEMENTS // (rows * Tk)))
    return [(slice(h0, h0 + heads), c0) for h0 in range(0, BH, heads) for c0 in range(0, Tq, rows)], rows


def chunk_keys(spec, Tk, chunk):
    """The most keys a chunk of up to `chunk` rows scores (what plan budgets by): all Tk, or under a window at most
    window + chunk (cost O(T x window), not O(T^2))."""
    return min(Tk, spec.window + chunk) if spec.window else Tk


def direct_ok(spec, n_max, d, dtype):
    """Can stage 1 use var.weight (e.g. softplus) instead of exp(logw - row max)? Always for unnormalised kinds;
    for normalised ones only when no row can underflow to all zeros: QK-norm bounds |s| <= scale(N) (a bias
    such as ALiBi is 0 on the diagonal). Decided from Python numbers only (no tensor is read: compile-friendly)."""
    var = spec.variant
    if var.weight is None or not var.normalise:
        return var.weight is not None
    if not var.qk_norm or var.params:
        return False
    n_max = min(n_max, spec.window) if spec.window else n_max  # N_i stops growing at the window
    bound = abs(spec.row_scale(float(n_max), d, {}))  # the scale grows with N: its largest at the last row
    return bound < (80.0 if dtype != torch.float64 else 700.0)  # softplus(-80) = 1.8e-35 > fp32 tiny


_BIAS = {}


def causal_bias(r, dtype, device):
    """(r, r) with -inf above the diagonal, 0 elsewhere: adding it is ~10x faster than masked_fill_ on a strided
    view (measured on CPU) and leaves the visible scores bit-identical."""
    key = (r, dtype, str(device))
    if key not in _BIAS:
        if len(_BIAS) > 64:
            _BIAS.clear()
        _BIAS[key] = torch.full((r, r), float("-inf"), dtype=dtype, device=device).triu_(1)
    return _BIAS[key]


def band_bias(r, cols, lag, window, dtype, device):
    """(r, cols) with 0 where key column c is visible to chunk row t under a window, -inf elsewhere: the row sits
    lag + t - c positions after the key, and sees it when 0 <= lag + t - c < window."""
    key = (r, cols, lag, window, dtype, str(device))
    if key not in _BIAS:
        if len(_BIAS) > 64:
            _BIAS.clear()
        dist = lag + torch.arange(r, device=device).view(r, 1) - torch.arange(cols, device=device).view(1, cols)
        _BIAS[key] = torch.zeros((r, cols), dtype=dtype, device=device).masked_fill_((dist < 0) | (dist >= window),
                                                                                      float("-inf"))
    return _BIAS[key]


def chunk_scores(q, k, spec, first, c0, r, hs, H, gate=None):
    """Scores of query rows c0 .. c0+r-1 (absolute positions first ..) of the flat heads hs against the keys
    k0 .. first + r - 1 that the chunk can see (k0 = spec.first_key(first): 0 without a window), -inf where a row
    does not see a key: (heads, r, first + r - k0). gate: the forget gate's c (B*H, Tk)."""
    k0 = spec.first_key(first)  # a window hides the keys before it from every row of the chunk: not computed
    s = q[hs, c0:c0 + r] @ k[hs, k0:first + r].transpose(-2, -1)
    if gate is not None:  # c_i - c_j
        s += gate[hs, first:first + r, None] - gate[hs, None, k0:first + r]
    if spec.window:
        s += band_bias(r, first + r - k0, first - k0, spec.window, s.dtype, s.device)
    else:  # keys before `first` are visible to every row of the chunk: only the last r keys form a causal triangle
        s[..., first:] += causal_bias(r, s.dtype, s.device)
    if spec.variant.bias is not None:
        pos = torch.arange(first, first + r, device=s.device).view(r, 1)
        heads = (torch.arange(hs.start, hs.stop, device=s.device) % H).view(-1, 1, 1)
        s = s + spec.variant.bias(pos, torch.arange(k0, first + r, device=s.device), heads, H)
    return s


def stage1_vjp(s, spec, n, direct, functional):
    """Stage 1's weights phi of scores s and a function mapping dL/dphi to dL/ds. Autograd on the chunk, or
    (functional=True: inside a custom op, where autograd records nothing) torch.func.vjp."""
    if functional:
        return torch.func.vjp(lambda x: spec.stage1(x, n, direct), s)
    with torch.enable_grad():
        s.requires_grad_(True)
        phi = spec.stage1(s, n, direct)
    return phi.detach(), lambda g: torch.autograd.grad(phi, s, g)


def chunk_weights(q, k, spec, n_all, pos_offset, c0, rows, hs, H, direct, grad=False, functional=False, gate=None):
    """Both stages for query rows c0 .. c0+rows-1 of flat heads hs. Returns (k0, tk, R, st, vjp): the weights of
    keys k0 .. tk - 1 are R * st['f'] with a per-row factor f (1, 1/S or 1/Z), so the row factors are applied to the small
    (rows x d) outputs, not to the (rows x T) weights. With grad=True, vjp maps dL/dphi to dL/ds (stage 1) and
    st holds what stage 2's derivative needs."""
    var, p = spec.variant, spec.reweight_p
    n = n_all[c0:c0 + rows]
    first = pos_offset + c0
    s = chunk_scores(q, k, spec, first, c0, n.shape[0], hs, H, gate)
    if grad:
        phi, vjp = stage1_vjp(s, spec, n, direct, functional)
    else:
        phi, vjp = spec.stage1(s, n, direct), None
    st = {"f": torch.ones_like(n), "phi": phi}
    R = phi
    if var.normalise:
        st["S"] = S = phi.sum(dim=-1, keepdim=True)
        st["f"] = 1.0 / S
        if p > 0:
            pos = torch.arange(first, first + n.shape[0], device=s.device)
            R, Z, st["aux"] = spec.reweight(phi, S, n, pos, inplace=not grad)
            st["Z"] = Z
            st["f"] = 1.0 / Z.clamp_min(torch.finfo(n.dtype).tiny)
    return spec.first_key(first), first + n.shape[0], R, st, vjp


def _flat(t):
    return t.reshape(-1, t.shape[-2], t.shape[-1])  # (B, H, T, d) -> (B*H, T, d)


def forward(q, k, v, spec, pos_offset, chunk, keep=None, gate=None):
    """q, k, v (B, H, T, d) in the accumulation dtype (fp32 or fp64), gate (B, H, Tk) or None; returns the output
    (B, H, Tq, d). With a list `keep`, each chunk is computed with what the backward needs and appended to it."""
    B, H, Tq, d = q.shape
    n_all, direct = spec.row_n(pos_offset, Tq, q), direct_ok(spec, pos_offset + Tq, d, q.dtype)
    qf, kf, vf, gf = _flat(q), _flat(k), _flat(v), _flat_gate(gate, q.dtype)
    out = torch.empty(qf.shape[:-1] + vf.shape[-1:], dtype=v.dtype, device=v.device)
    chunks, rows = plan(qf.shape[0], Tq, chunk_keys(spec, kf.shape[1], chunk), chunk)
    for hs, c0 in chunks:
        ch = chunk_weights(qf, kf, spec, n_all, pos_offset, c0, rows, hs, H, direct, keep is not None, gate=gf)
        k0, tk, R, st, _ = ch
        torch.mul(R @ vf[hs, k0:tk], st["f"], out=out[hs, c0:c0 + rows])
        if keep is not None:
            keep.append(ch)
    return out.view(B, H, Tq, -1)


def backward(dout, q, k, v, out, spec, pos_offset, chunk, kept=None, functional=False, gate=None):
    """dL/dq, dL/dk, dL/dv (and dL/dgate, None without a gate) for the forward above, chunk by chunk: each
    chunk's weights recomputed, or taken from `kept` (the forward's keep list; emptied as it goes). functional:
    see stage1_vjp. The gate's gradient is the score gradient's row sums at the queries' positions minus its
    column sums at the keys'."""
    B, H, Tq, d = q.shape
    n_all, direct = spec.row_n(pos_offset, Tq, q), direct_ok(spec, pos_offset + Tq, d, q.dtype)
    qf, kf, vf, gf = _flat(q), _flat(k), _flat(v), _flat_gate(gate, q.dtype)
    dg = None if gf is None else torch.zeros(gf.shape, dtype=gf.dtype, device=gf.device)
    # contiguous whatever the inputs' layout (compiled code may hand over strided views): as the fake kernel says
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (qf, kf, vf))
    dout = _flat(dout.to(v.dtype))
    delta = (dout * _flat(out)).sum(dim=-1, keepdim=True)  # sum_j w_ij dL/dw_ij = dout_i . out_i (FlashAttention)
    chunks, rows = plan(qf.shape[0], Tq, chunk_keys(spec, kf.shape[1], chunk), chunk)
    for i, (hs, c0) in enumerate(chunks):
        if kept:
            (k0, tk, R, st, vjp), kept[i] = kept[i], None  # free each kept chunk as soon as it is used
        else:
            k0, tk, R, st, vjp = chunk_weights(qf, kf, spec, n_all, pos_offset, c0, rows, hs, H, direct, True,
                                               functional, gf)
        sl = slice(c0, c0 + R.shape[-2])
        do = dout[hs, sl]
        dv[hs, k0:tk] += R.transpose(-2, -1) @ (do * st["f"])
        g = do @ vf[hs, k0:tk].transpose(-2, -1)  # dL/dw
        if spec.variant.normalise:
            g.sub_(delta[hs, sl])  # dL/dw_ij - sum_j w_ij dL/dw_ij: the normalisation's derivative
            if spec.reweight_p > 0:
                g = spec.reweight_grad(g, st["phi"], st["S"], st["Z"], st["aux"])
            else:
                g.mul_(st["f"])
        (ds,) = vjp(g)
        dq[hs, sl] = ds @ kf[hs, k0:tk]
        dk[hs, k0:tk] += ds.transpose(-2, -1) @ qf[hs, sl]
        if dg is not None:
            dg[hs, tk - ds.shape[-2]:tk] += ds.sum(dim=-1)
            dg[hs, k0:tk] -= ds.sum(dim=-2)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), None if dg is None else dg.view(gate.shape)


def _flat_gate(gate, dtype):
    return None if gate is None else gate.reshape(-1, gate.shape[-1]).to(dtype)  # (B, H, Tk) -> (B*H, Tk)


# Two thin wrappers around forward/backward. Compiled code calls them as torch.library custom ops: opaque to
# torch.compile (register_fake gives it the shapes; no graph break, nothing traced inside), autograd connects them,
# and each chunk is recomputed in the backward. Eager code (the CPU demo's training) goes through an autograd
# Function that may keep the forward's chunks for the backward: below KEEP_ELEMENTS chunk elements per call that
# measured ~15% faster per demo train step for LSSAR on CPU, where softplus alone costs as much as a matmul; above
# it memory stays O(chunk x T) as in the forward.
KEEP_ELEMENTS = 2**24  # the eager backward reuses the forward's chunk tensors while they total <= this (64 MB fp32)


@contextmanager
def exact(device):
    """fp32 matmuls in fp32: the caller's autocast must not reach the chunks' matmuls, nor TF32 (train.py allows it
    for the model's other matmuls on GPUs): the p-th power of the re-weighting amplifies a score's error ~p-fold."""
    cuda = device.type == "cuda"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = tf32


@torch.library.custom_op("softplus_attn::chunked_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None, spec: str, pos_offset: int,
            chunk: int) -> torch.Tensor:
    with exact(q.device):
        return forward(q, k, v, kernels.spec_from_key(spec), pos_offset, chunk, gate=gate)


@torch.library.custom_op("softplus_attn::chunked_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            gate: torch.Tensor | None, spec: str, pos_offset: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor, torch.Tensor]:
    with exact(q.device):
        dq, dk, dv, dg = backward(dout, q, k, v, out, kernels.spec_from_key(spec), pos_offset, chunk, functional=True,
                                  gate=gate)
    return dq, dk, dv, q.new_zeros(0) if dg is None else dg  # (an op returns tensors: empty without a gate)


@_fwd_op.register_fake
def _(q, k, v, gate, spec, pos_offset, chunk):
    return q.new_empty(q.shape[:-1] + v.shape[-1:], dtype=v.dtype)


@_bwd_op.register_fake
def _(dout, q, k, v, out, gate, spec, pos_offset, chunk):
    # contiguous, as backward() returns
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_zeros(0) if gate is None else gate.new_empty(gate.shape, dtype=q.dtype))


def _setup(ctx, inputs, output):
    q, k, v, gate, spec, pos_offset, chunk = inputs
    ctx.save_for_backward(q, k, v, output, gate)
    ctx.args = (spec, pos_offset, chunk)


def _backward(ctx, dout):
    q, k, v, out, gate = ctx.saved_tensors
    dq, dk, dv, dg = _bwd_op(dout, q, k, v, out, gate, *ctx.args)
    return dq, dk, dv, None if gate is None else dg, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


class _EagerAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, spec, pos_offset, chunk):
        B, H, Tq, _ = q.shape
        per_row = B * H * k.shape[2] * (2 if spec.reweight_p == 0 else 4)  # s and phi (+ R and u^(p-1))
        ctx.kept = [] if Tq * per_row <= KEEP_ELEMENTS else None
        with exact(q.device):
            out = forward(q, k, v, spec, pos_offset, chunk, keep=ctx.kept, gate=gate)
        ctx.save_for_backward(q, k, v, out, gate)
        ctx.args = (spec, pos_offset, chunk)
        return out

    @staticmethod
    def backward(ctx, dout):
        kept, ctx.kept = ctx.kept, None
        q, k, v, out, gate = ctx.saved_tensors
        with exact(dout.device):
            dq, dk, dv, dg = backward(dout, q, k, v, out, *ctx.args, kept=kept, gate=gate)
        return dq, dk, dv, dg, None, None, None


def supports(spec, q, needs_grad):
    return None


def attend(q, k, v, spec, pos_offset, *, chunk=256, needs_grad=False, gate=None):
    """Exact for every spec; q, k arrive in fp32 (fp64) from model.prepare; the output comes back in v's dtype."""
    vv = v.to(q.dtype)
    if needs_grad and not torch.compiler.is_compiling():
        return _EagerAttention.apply(q, k, vv, gate, spec, pos_offset, chunk).to(v.dtype)
    return _fwd_op(q, k, vv, gate, spec.key(), pos_offset, chunk).to(v.dtype)


def weights(q, k, spec, pos_offset, *, chunk=256, gate=None):
    """The final weights, chunk by chunk: yields (first query position, w (B, H, rows, keys seen by the chunk))."""
    B, H, Tq, d = q.shape
    n_all, direct = spec.row_n(pos_offset, Tq, q), direct_ok(spec, pos_offset + Tq, d, q.dtype)
    qf, kf, gf = _flat(q), _flat(k), _flat_gate(gate, q.dtype)
    chunks, rows = plan(qf.shape[0], Tq, chunk_keys(spec, kf.shape[1], chunk), chunk, all_heads=True)
    for hs, c0 in chunks:
        k0, tk, R, st, _ = chunk_weights(qf, kf, spec, n_all, pos_offset, c0, rows, hs, H, direct, gate=gf)
        w = (R * st["f"]).view(B, H, -1, tk - k0)
        yield pos_offset + c0, F.pad(w, (k0, 0)) if k0 else w  # keys from 0 on: the window's hidden ones weigh 0


def row_logsumexp(q, k, spec, pos_offset, chunk=256, gate=None):
    """log sum_j exp(logw_ij) of every query row (B, H, Tq) of normalised variants, over this backend's chunks
    (flex's re-weighting pass needs the row sums S_i: flex on CPU cannot return them)."""
    B, H, Tq, _ = q.shape
    var, n_all = spec.variant, spec.row_n(pos_offset, Tq, q)
    qf, kf, gf = _flat(q), _flat(k), _flat_gate(gate, q.dtype)
    lse = torch.empty(qf.shape[:-1], dtype=q.dtype, device=q.device)
    chunks, rows = plan(qf.shape[0], Tq, chunk_keys(spec, kf.shape[1], chunk), chunk)
    for hs, c0 in chunks:
        n = n_all[c0:c0 + rows]
        s = chunk_scores(qf, kf, spec, pos_offset + c0, c0, n.shape[0], hs, H, gf)
        lse[hs, c0:c0 + n.shape[0]] = torch.logsumexp(s if var.logw is None else var.logw(s, n), dim=-1)
    return lse.view(B, H, Tq)

