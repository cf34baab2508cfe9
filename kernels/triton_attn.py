"""
Fused Triton attention (forward + backward) for the repo's normalised causal attention kinds:

  kind="softplus"  LSSA: w_tj = softplus(s_tj); with p > 0 LSSAR (LSSA + re-weighting, the headline p = 15)
  kind="exp"       softmax / SSMax: w_tj = exp(s_tj), with or without the same re-weighting

The caller prepares the inputs (QK-norm and the per-row scale folded into q, see model.py), so the score of query
row t and key j is simply s_tj = q_t . k_j. Row t sits at absolute position P_t = pos_offset + t, sees the keys
j <= P_t, and N_t = P_t + 1. Everything is accumulated in fp32; no T x T tensor is ever stored (memory O(T)).

Forward, one program per (block of query rows, batch x head), looping over the key blocks the rows can see
(blocks fully visible to every row run without the causal mask, the rest with it):
  p = 0   one sweep: acc += w V, S += sum_j w; out = acc / S. Softplus needs no running max: QK-norm bounds
          |s| <= log(d) log(N) (~40 at d = 64, N = 16K), far from fp32 overflow or underflow. exp keeps
          FlashAttention's online row max M and rescales S and acc when M grows.
  p > 0   two sweeps. 1) S_t and the row max (of w for softplus; for exp the score max M, so w = exp(s - M) <= 1).
          2) the re-weighted sweep, in ratio form, exactly as model.reweight (kernels/chunked.py calls it):
              x_tj = N_t w_tj / S_t - O_t            (O_t = 0 for positions < REWEIGHT_EXEMPT_ROWS, else 1)
              xm_t = max_j x_tj = N_t max_j w_tj / S_t - O_t    (x increases with w)
              u_tj = ReLU(x_tj) / xm_t = ReLU(N_t w_tj - O_t S_t) / (N_t max_j w_tj - O_t S_t),   R = u^p
          u lies in [0, 1], so u^15 cannot overflow (x^15 would: x reaches N_t), and R / sum_j R is unchanged.
          A row with xm_t <= 0 (an exactly uniform row with O_t = 1) has R = 0 and outputs exactly 0.
          The denominator is written as S_t * xm_t = N_t max w - O_t S_t: for an exactly uniform row (N_t equal
          weights summed exactly) it is exactly 0, with no rounding of a division in the way.
  Per-row statistics for the backward, (B, H, Tq) fp32: S (row sum of w), M (max w for softplus, max s for exp),
  Z (sum_j R; = S without re-weighting).

Backward (FlashAttention-2 style: the weights are recomputed block by block), delta_t = dout_t . out_t and
g_tj = dout_t . v_j - delta_t:
  p = 0   dL/dw_tj = g_tj / S_t
  p > 0   dL/dw_tj = c_t (g_tj u_tj^(p-1) - m_t),  c_t = p a_t / Z_t,  a_t = N_t / (S_t xm_t),
          m_t = sum_k w_tk g_tk u_tk^(p-1) / S_t   (model.reweight_grad, same equations)
  ds = dL/dw * w'(s) with w' = sigmoid(s) (softplus) or w (exp); dq = ds K, dk = ds^T Q, dv = (R / Z)^T dout.
  Two kernels, deterministic (no atomics), as in Triton's fused-attention tutorial (python/tutorials/
  06-fused-attention.py: separate dK/dV and dQ loops):
  - dq, one program per query block, ONE sweep over its keys: m_t needs the whole row before any ds is known, but
    dq_t = c_t (sum_j g u^(p-1) w' k_j - m_t sum_j w' k_j), so the sweep accumulates m_t and both sums and
    finishes dq at the end (one extra dot per block instead of a second sweep). It stores m_t.
  - dk / dv, one program per key block, sweeping the query blocks that see it; it reads m_t (the m_t
    "preprocessing" sweep is thus the dq kernel itself).

Under TRITON_INTERPRET=1 (set below when there is no GPU) CPU tensors run through Triton's interpreter: exact
and slow, used by tests/test_triton.py. Block sizes are small there (16: fast, and it exercises the multi-block
logic); the GPU sizes in _config are reasonable defaults for H100 / H200, not tuned.
"""

import math
import os

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    # No GPU: CPU tensors can only run through Triton's interpreter (numpy; exact results, slowly). Triton reads
    # the flag when a function is decorated with @triton.jit, its own (tl.sum, tl.zeros, ...) included, so it has
    # to be set before triton is first imported; _interpreter_ready() tells whether that worked.
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

KINDS = ("softplus", "exp")
MAX_HEAD_SIZE = 128  # the GPU block sizes below are sized for head sizes up to 128 (registers / shared memory)


# -----------------------------------------------------------------------------
# elementwise pieces


@triton.jit
def _load_rows(base, rows, dims, n_rows, D):
    # (len(rows), BLOCK_D) tile of a contiguous (n_rows, D) matrix, zeros past its edges
    mask = (rows[:, None] < n_rows) & (dims[None, :] < D)
    return tl.load(base + rows[:, None] * D + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, rows, dims, n_rows, D, x):
    mask = (rows[:, None] < n_rows) & (dims[None, :] < D)
    tl.store(base + rows[:, None] * D + dims[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _safe_inv(x):
    # 1 / x where x > 0, else 0 (a row without weight outputs 0 and gets no gradient)
    return tl.where(x > 0.0, 1.0 / tl.where(x > 0.0, x, 1.0), 0.0)


@triton.jit
def _log1p(t):
    # log(1 + t) to full relative accuracy also for tiny t, without a log1p primitive (Goldberg's trick, see
    # "What every computer scientist should know about floating-point arithmetic", Theorem 4): with y = fl(1 + t),
    # log(y) * t / (y - 1) cancels the rounding of y
    y = 1.0 + t
    d = y - 1.0
    return tl.where(d == 0.0, t, tl.log(y) * (t / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _softplus(s):
    # log(1 + e^s) = max(s, 0) + log(1 + e^-|s|): no overflow for large s, no underflow to 0 for very negative s
    # (model.py: softplus with threshold 40). s = -inf (masked) gives exactly 0.
    return tl.maximum(s, 0.0) + _log1p(tl.exp(-tl.abs(s)))


@triton.jit
def _scores(q, k, pos, cols, MASK: tl.constexpr, PREC: tl.constexpr):
    # q (BM, BD), k (BN, BD) -> s (BM, BN); with MASK, -inf on the keys after a row's position: every weight
    # below (softplus, exp, their derivatives, the re-weighting) is then exactly 0 there
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASK:
        s = tl.where(cols[None, :] <= pos[:, None], s, float("-inf"))
    return s


@triton.jit
def _weights(s, M, EXP: tl.constexpr):
    # stage 1: exp(s - M) relative to the row max M (M: (BM,)), or softplus(s)
    if EXP:
        w = tl.exp(s - M[:, None])
    else:
        w = _softplus(s)
    return w


@triton.jit
def _dweights(s, w, EXP: tl.constexpr):
    # dw / ds: exp' = exp, softplus' = sigmoid
    if EXP:
        dw = w
    else:
        dw = 1.0 / (1.0 + tl.exp(-s))
    return dw


@triton.jit
def _reweight_row(pos, S, M, EXP: tl.constexpr, EXEMPT: tl.constexpr):
    # per-row constants of the re-weighting (all (BM,)): N_t, O_t and 1 / (S_t xm_t) = 1 / (N_t max w - O_t S_t),
    # 0 for a row with xm_t <= 0 (R = 0 there)
    N = (pos + 1).to(tl.float32)
    O = tl.where(pos >= EXEMPT, 1.0, 0.0)
    if EXP:
        den = N - O * S  # max_j w = exp(M - M) = 1
    else:
        den = N * M - O * S
    return N, O, _safe_inv(den)


@triton.jit
def _ratio(w, N, O, S, inv):
    # u = ReLU(x) / xm = ReLU(N w - O S) / (N max w - O S), in [0, 1]: (BM, BN)
    return tl.maximum(N[:, None] * w - (O * S)[:, None], 0.0) * inv[:, None]


@triton.jit
def _upow(u, E: tl.constexpr, E_INT: tl.constexpr):
    # u^E for u >= 0 and 0 where u = 0 (the ReLU's zero, also for E <= 0). Called with E = p - 1:
    # R = u * _upow(u) = u^p and dR/du = p * _upow(u). A whole E (E_INT >= 0) by repeated squaring (no exp / log,
    # and exact-ish); otherwise exp2(E log2 u).
    pos = u > 0.0
    if E_INT >= 0:
        r = tl.where(pos, 1.0, 0.0)
        sq = u
        for i in tl.static_range(7):
            if (E_INT >> i) & 1:
                r = r * sq
            if (E_INT >> i) > 1:
                sq = sq * sq
    else:
        r = tl.where(pos, tl.exp2(E * tl.log2(tl.where(pos, u, 1.0))), 0.0)
    return r


# -----------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, N, O, inv, lo, hi, Tk, D,
               STAGE: tl.constexpr, MASK: tl.constexpr, EXP: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
               PREC_QK: tl.constexpr, PREC_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key blocks lo, lo + BLOCK_N, .. < hi for one query block; acc (BM, BD), S, M, Z (BM,).
    STAGE 1: S and the row max only (LSSAR's first sweep); 2: also acc += w V (no re-weighting);
    3: acc += R V and Z += sum R, with the final S and M (LSSAR's second sweep)."""
    dims = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s = _scores(q, _load_rows(Kb, cols, dims, Tk, D), pos, cols, MASK, PREC_QK)  # (BM, BN)
        if STAGE == 3:
            u = _ratio(_weights(s, M, EXP), N, O, S, inv)
            w = u * _upow(u, E, E_INT)  # R = u^p
            Z += tl.sum(w, 1)
        elif EXP:  # online max: what was summed against the previous max is rescaled (FlashAttention)
            M_new = tl.maximum(M, tl.max(s, 1))  # finite: every row sees key 0, in the first block swept
            alpha = tl.exp(M - M_new)
            w = tl.exp(s - M_new[:, None])
            S = S * alpha + tl.sum(w, 1)
            if STAGE == 2:
                acc = acc * alpha[:, None]
            M = M_new
        else:
            w = _softplus(s)
            S += tl.sum(w, 1)
            if STAGE == 1:
                M = tl.maximum(M, tl.max(w, 1))
        if STAGE != 1:
            v = _load_rows(Vb, cols, dims, Tk, D)
            acc = tl.dot(w.to(v.dtype), v, acc, input_precision=PREC_V)
    return acc, S, M, Z


@triton.jit
def _fwd_kernel(Q, K, V, Out, S_out, M_out, Z_out, Tq, Tk, off, D,
                REWEIGHT: tl.constexpr, EXP: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
                EXEMPT: tl.constexpr, PREC_QK: tl.constexpr, PREC_V: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    Kb, Vb = K + bh * Tk * D, V + bh * Tk * D
    q = _load_rows(Q + bh * Tq * D, rows, dims, Tq, D)  # (BM, BD), kept for all the sweeps
    pos = off + rows  # absolute positions
    # keys [0, full) are visible to every row of the block; [full, hi) need the mask; keys >= hi to none
    full = ((off + m0 + 1) // BLOCK_N) * BLOCK_N
    hi = off + tl.minimum(m0 + BLOCK_M, Tq)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    S = tl.zeros([BLOCK_M], dtype=tl.float32)
    M = tl.full([BLOCK_M], float("-inf"), tl.float32)
    Z = tl.zeros([BLOCK_M], dtype=tl.float32)
    N = (pos + 1).to(tl.float32)
    O, inv = N, N  # unused without re-weighting
    if REWEIGHT:
        acc, S, M, Z = _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, N, O, inv, 0, full, Tk, D,
                                  1, False, EXP, E, E_INT, PREC_QK, PREC_V, BLOCK_N, BLOCK_D)
        acc, S, M, Z = _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, N, O, inv, full, hi, Tk, D,
                                  1, True, EXP, E, E_INT, PREC_QK, PREC_V, BLOCK_N, BLOCK_D)
        N, O, inv = _reweight_row(pos, S, M, EXP, EXEMPT)
        acc, S, M, Z = _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, N, O, inv, 0, full, Tk, D,
                                  3, False, EXP, E, E_INT, PREC_QK, PREC_V, BLOCK_N, BLOCK_D)
        acc, S, M, Z = _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, N, O, inv, full, hi, Tk, D,
                                  3, True, EXP, E, E_INT, PREC_QK, PREC_V, BLOCK_N, BLOCK_D)
    else:
        acc, S, M, Z = _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, N, O, inv, 0, full, Tk, D,
                                  2, False, EXP, E, E_INT, PREC_QK, PREC_V, BLOCK_N, BLOCK_D)
        acc, S, M, Z = _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, N, O, inv, full, hi, Tk, D,
                                  2, True, EXP, E, E_INT, PREC_QK, PREC_V, BLOCK_N, BLOCK_D)
        Z = S
    _store_rows(Out + bh * Tq * D, rows, dims, Tq, D, acc * _safe_inv(Z)[:, None])
    ok = rows < Tq
    tl.store(S_out + bh * Tq + rows, S, mask=ok)
    tl.store(M_out + bh * Tq + rows, M, mask=ok)
    tl.store(Z_out + bh * Tq + rows, Z, mask=ok)


# -----------------------------------------------------------------------------
# backward


@triton.jit
def _load_row_stats(S_in, M_in, Z_in, Delta, bh, rows, Tq):
    # per-row statistics (BM,); rows past Tq get harmless values (their q and dout are 0, so they add nothing)
    ok = rows < Tq
    i = bh * Tq + rows
    S = tl.load(S_in + i, mask=ok, other=1.0)
    M = tl.load(M_in + i, mask=ok, other=0.0)
    Z = tl.load(Z_in + i, mask=ok, other=1.0)
    delta = tl.load(Delta + i, mask=ok, other=0.0)
    return S, M, Z, delta


@triton.jit
def _dq_sweep(acc1, acc2, msum, q, do, S, M, delta, pos, N, O, inv, Kb, Vb, lo, hi, Tk, D,
              MASK: tl.constexpr, REWEIGHT: tl.constexpr, EXP: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
              PREC_QK: tl.constexpr, PREC_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key blocks lo .. < hi of one query block. Accumulates acc1 = sum_j G_tj w'_tj k_j (BM, BD) with
    G = g (p = 0) or g u^(p-1) (p > 0); with re-weighting also acc2 = sum_j w'_tj k_j and msum = sum_j w_tj G_tj."""
    dims = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(Kb, cols, dims, Tk, D)
        v = _load_rows(Vb, cols, dims, Tk, D)
        s = _scores(q, k, pos, cols, MASK, PREC_QK)  # (BM, BN)
        w = _weights(s, M, EXP)
        dw = _dweights(s, w, EXP)
        g = tl.dot(do, tl.trans(v), input_precision=PREC_V) - delta[:, None]  # dout_t . v_j - delta_t
        if REWEIGHT:
            g = g * _upow(_ratio(w, N, O, S, inv), E, E_INT)
            msum += tl.sum(w * g, 1)
            acc2 = tl.dot(dw.to(k.dtype), k, acc2, input_precision=PREC_QK)
        acc1 = tl.dot((g * dw).to(k.dtype), k, acc1, input_precision=PREC_QK)
    return acc1, acc2, msum


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, S_in, M_in, Z_in, Delta, Mrow, DQ, Tq, Tk, off, D,
                   REWEIGHT: tl.constexpr, EXP: tl.constexpr, P: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
                   EXEMPT: tl.constexpr, PREC_QK: tl.constexpr, PREC_V: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    Kb, Vb = K + bh * Tk * D, V + bh * Tk * D
    q = _load_rows(Q + bh * Tq * D, rows, dims, Tq, D)  # (BM, BD)
    do = _load_rows(DO + bh * Tq * D, rows, dims, Tq, D)
    S, M, Z, delta = _load_row_stats(S_in, M_in, Z_in, Delta, bh, rows, Tq)
    pos = off + rows
    N, O, inv = _reweight_row(pos, S, M, EXP, EXEMPT)
    full = ((off + m0 + 1) // BLOCK_N) * BLOCK_N  # as in the forward
    hi = off + tl.minimum(m0 + BLOCK_M, Tq)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    msum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1, acc2, msum = _dq_sweep(acc1, acc2, msum, q, do, S, M, delta, pos, N, O, inv, Kb, Vb, 0, full, Tk, D,
                                 False, REWEIGHT, EXP, E, E_INT, PREC_QK, PREC_V, BLOCK_N, BLOCK_D)
    acc1, acc2, msum = _dq_sweep(acc1, acc2, msum, q, do, S, M, delta, pos, N, O, inv, Kb, Vb, full, hi, Tk, D,
                                 True, REWEIGHT, EXP, E, E_INT, PREC_QK, PREC_V, BLOCK_N, BLOCK_D)
    if REWEIGHT:
        m = msum / S  # m_t, for the dk / dv kernel
        tl.store(Mrow + bh * Tq + rows, m, mask=rows < Tq)
        c = P * N * inv * _safe_inv(Z)  # p a_t / Z_t, 0 for a row without weight
        dq = c[:, None] * (acc1 - m[:, None] * acc2)
    else:
        dq = acc1 / S[:, None]
    _store_rows(DQ + bh * Tq * D, rows, dims, Tq, D, dq)


@triton.jit
def _dkdv_sweep(dk, dv, k, v, Q, DO, S_in, M_in, Z_in, Delta, Mrow, bh, cols, lo, hi, Tq, off, D,
                MASK: tl.constexpr, REWEIGHT: tl.constexpr, EXP: tl.constexpr, P: tl.constexpr, E: tl.constexpr,
                E_INT: tl.constexpr, EXEMPT: tl.constexpr, PREC_QK: tl.constexpr, PREC_V: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Query blocks lo .. < hi against one key block k, v (BN, BD): dk += ds^T q, dv += (w / S or R / Z)^T dout."""
    dims = tl.arange(0, BLOCK_D)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(Q + bh * Tq * D, rows, dims, Tq, D)  # (BM, BD)
        do = _load_rows(DO + bh * Tq * D, rows, dims, Tq, D)
        S, M, Z, delta = _load_row_stats(S_in, M_in, Z_in, Delta, bh, rows, Tq)
        pos = off + rows
        s = _scores(q, k, pos, cols, MASK, PREC_QK)  # (BM, BN)
        w = _weights(s, M, EXP)
        dw = _dweights(s, w, EXP)
        g = tl.dot(do, tl.trans(v), input_precision=PREC_V) - delta[:, None]
        if REWEIGHT:
            N, O, inv = _reweight_row(pos, S, M, EXP, EXEMPT)
            u = _ratio(w, N, O, S, inv)
            du = _upow(u, E, E_INT)  # u^(p-1)
            rz = _safe_inv(Z)
            mrow = tl.load(Mrow + bh * Tq + rows, mask=rows < Tq, other=0.0)  # m_t from the dq kernel
            a = u * du * rz[:, None]  # R / Z
            ds = (P * N * inv * rz)[:, None] * (g * du - mrow[:, None]) * dw
        else:
            a = w / S[:, None]
            ds = g / S[:, None] * dw
        dv = tl.dot(tl.trans(a).to(do.dtype), do, dv, input_precision=PREC_V)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, dk, input_precision=PREC_QK)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, S_in, M_in, Z_in, Delta, Mrow, DK, DV, Tq, Tk, off, D,
                     REWEIGHT: tl.constexpr, EXP: tl.constexpr, P: tl.constexpr, E: tl.constexpr,
                     E_INT: tl.constexpr, EXEMPT: tl.constexpr, PREC_QK: tl.constexpr, PREC_V: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_rows(K + bh * Tk * D, cols, dims, Tk, D)  # (BN, BD), kept for the sweep
    v = _load_rows(V + bh * Tk * D, cols, dims, Tk, D)
    # query rows t see key n0 from t = n0 - off on, and every key of the block from t = n0 + BLOCK_N - 1 - off on
    lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
    full = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M, lo)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkdv_sweep(dk, dv, k, v, Q, DO, S_in, M_in, Z_in, Delta, Mrow, bh, cols, lo, tl.minimum(full, Tq),
                         Tq, off, D, True, REWEIGHT, EXP, P, E, E_INT, EXEMPT, PREC_QK, PREC_V, BLOCK_M, BLOCK_D)
    dk, dv = _dkdv_sweep(dk, dv, k, v, Q, DO, S_in, M_in, Z_in, Delta, Mrow, bh, cols, full, Tq,
                         Tq, off, D, False, REWEIGHT, EXP, P, E, E_INT, EXEMPT, PREC_QK, PREC_V, BLOCK_M, BLOCK_D)
    _store_rows(DK + bh * Tk * D, cols, dims, Tk, D, dk)
    _store_rows(DV + bh * Tk * D, cols, dims, Tk, D, dv)


# -----------------------------------------------------------------------------
# launchers


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_ready():
    # triton's own @jit functions (tl.sum, tl.max, tl.zeros) are interpretable only if TRITON_INTERPRET was set
    # when triton was first imported (e.g. not when torch.compile imported it earlier in the process)
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def _config(kernel, Tq, D, elt_size):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M = query rows, BLOCK_N = keys per step or program.
    Interpreter: 16 x 16 (fast there, and every test length crosses block edges). GPU: untuned; chosen by compiling
    for sm_90 without a GPU (triton 3.9) as the tiles with no register spills for 16-bit q, k, in the range of
    Triton's fused-attention tutorial. fp32 q, k with input_precision="ieee" are FMA dots, whose operands do not
    fit in registers at any tile: the smallest spilling tiles are used (exact, not fast; see FP32_DOT)."""
    if _interpreting():
        return 16, 16, 1, 1
    small = max(16, triton.next_power_of_2(D)) <= 64
    rows = lambda bm: max(16, min(bm, triton.next_power_of_2(Tq)))  # decoding (Tq = 1) needs no 128-row block
    if elt_size == 2:
        cfg = {"fwd": (rows(128), 64 if small else 32, 8, 3 if small else 2),
               "dq": (rows(64), 64 if small else 32, 8, 2),
               "dkdv": (32, 64, 8, 2)}
    else:
        cfg = {"fwd": (rows(32), 32, 4, 2), "dq": (rows(64), 32, 8, 2), "dkdv": (32, 64, 8, 2)}
    return cfg[kernel]


# input_precision of dots with fp32 operands: "ieee" (exact) under the interpreter; on a GPU "tf32x3" (three
# tensor-core passes, near-fp32: compiled for sm_90 plain "ieee" FMA loops spill registers at every tile size tried).
# The GPU acceptance run (.ci/gpu_acceptance) checks it against the float64 oracle at the fp32 tolerances.
FP32_DOT = "ieee" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "tf32x3"


def _prec(dtype):
    # fp32 operands: exact IEEE products (the tests compare with 1e-5); fp16 / bf16: tensor cores with fp32
    # accumulation (input_precision only matters for fp32 operands; "tf32" is triton's default)
    return FP32_DOT if dtype == torch.float32 else "tf32"


def _constants(p, kind):
    """The kernels' compile-time constants for (p, kind)."""
    from model import REWEIGHT_EXEMPT_ROWS  # here, not at the top: model.py may import this module

    e = p - 1.0
    e_int = int(e) if e == int(e) and 0 <= e < 128 else -1
    return dict(REWEIGHT=p > 0, EXP=kind == "exp", E=e, E_INT=e_int, EXEMPT=REWEIGHT_EXEMPT_ROWS)


def supports(q, k, v, kind="softplus", p=0.0):
    """None if these kernels compute this call, else a one-line reason."""
    if kind not in KINDS:
        return f"kind {kind!r} unknown; the triton kernels compute {', '.join(KINDS)}"
    if not (p >= 0 and math.isfinite(p)):
        return f"reweight p must be finite and >= 0, got {p}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be (B, H, T, head size)"
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match"
    if not 1 <= q.shape[3] <= MAX_HEAD_SIZE:
        return f"head size {q.shape[3]} outside 1..{MAX_HEAD_SIZE}"
    ok = (torch.float32, torch.float16, torch.bfloat16)
    if any(t.dtype not in ok for t in (q, k, v)):
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernels take float32, float16 and bfloat16"
    if len({t.device for t in (q, k, v)}) > 1:
        return "q, k, v are on different devices"
    if q.device.type != "cuda":
        if not _interpreting():
            return f"triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones), got {q.device.type}"
        if not _interpreter_ready():
            return "triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run"
        if any(t.dtype == torch.bfloat16 for t in (q, k, v)):
            return "the Triton interpreter does not compute bfloat16 correctly"
    return None


def _check(q, k, v, pos_offset, p, kind):
    why = supports(q, k, v, kind, p)
    if why is None and not 0 <= pos_offset <= k.shape[2] - q.shape[2]:
        why = f"pos_offset={pos_offset} with Tq={q.shape[2]} needs 0 <= pos_offset <= Tk - Tq = {k.shape[2] - q.shape[2]}"
    if why:
        raise ValueError(why)


def _qk(q, k):
    # one dtype for the q . k dot (e.g. fp32 q with fp16 k: both fp32); contiguous (B, H, T, D) for the kernels
    dt = torch.promote_types(q.dtype, k.dtype)
    return q.to(dt).contiguous(), k.to(dt).contiguous()


def forward(q, k, v, pos_offset, p, kind="softplus"):
    """q (B, H, Tq, D) prepared (QK-norm and row scale applied), k, v (B, H, Tk, D) -> (out (B, H, Tq, D) in v's
    dtype, S, M, Z (B, H, Tq) fp32 row statistics for `backward`)."""
    _check(q, k, v, pos_offset, p, kind)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    q, k = _qk(q, k)
    v = v.contiguous()
    out = torch.empty((B, H, Tq, D), dtype=v.dtype, device=v.device)
    S, M, Z = (torch.empty((B, H, Tq), dtype=torch.float32, device=q.device) for _ in range(3))
    if out.numel() == 0:
        return out, S, M, Z
    bm, bn, warps, stages = _config("fwd", Tq, D, q.element_size())
    grid = (triton.cdiv(Tq, bm), B * H)
    _fwd_kernel[grid](q, k, v, out, S, M, Z, Tq, Tk, pos_offset, D, **_constants(p, kind),
                      PREC_QK=_prec(q.dtype), PREC_V=_prec(v.dtype), BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=warps, num_stages=stages)
    return out, S, M, Z


def backward(dout, q, k, v, out, S, M, Z, pos_offset, p, kind="softplus"):
    """Gradients (dq, dk, dv) of `forward` for the output gradient dout (B, H, Tq, D), in q's, k's, v's dtypes."""
    _check(q, k, v, pos_offset, p, kind)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dtypes = q.dtype, k.dtype, v.dtype
    if q.numel() == 0 or k.numel() == 0:  # no query rows, keys or heads: nothing to launch
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    q, k = _qk(q, k)
    v = v.contiguous()
    dout = dout.to(v.dtype).contiguous()
    delta = (dout.float() * out.float()).sum(dim=-1)  # (B, H, Tq): sum_j w_tj dL/dw_tj = dout_t . out_t
    mrow = torch.zeros_like(S)  # m_t, written by the dq kernel when re-weighting, read by the dk / dv kernel
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    consts = dict(**_constants(p, kind), P=float(p), PREC_QK=_prec(q.dtype), PREC_V=_prec(v.dtype),
                  BLOCK_D=max(16, triton.next_power_of_2(D)))
    bm, bn, warps, stages = _config("dq", Tq, D, q.element_size())
    _bwd_dq_kernel[(triton.cdiv(Tq, bm), B * H)](q, k, v, dout, S, M, Z, delta, mrow, dq, Tq, Tk, pos_offset, D,
                                                 **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    bm, bn, warps, stages = _config("dkdv", Tq, D, q.element_size())
    _bwd_dkdv_kernel[(triton.cdiv(Tk, bn), B * H)](q, k, v, dout, S, M, Z, delta, mrow, dk, dv, Tq, Tk, pos_offset,
                                                   D, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                   num_stages=stages)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])


# -----------------------------------------------------------------------------
# autograd + torch.compile: two custom ops, opaque to the compiler (no graph breaks)


# A kernel that fails to compile or launch on the user's GPU must not crash a training run: the op warns once
# (kind, shape, error) and computes the call with the math backend (kernels/chunked.py) instead, in the op itself,
# so that this also holds inside torch.compile'd code. NaN row statistics tell the backward to do the same.
# With SOFTPLUS_ATTN_STRICT=1 in the environment the failure is raised instead: the GPU tests and the acceptance
# run set it, so that a kernel that does not work on a GPU fails them rather than passing on the math fallback.
_WARNED = set()
STRICT_ENV = "SOFTPLUS_ATTN_STRICT"


def _strict():
    return os.environ.get(STRICT_ENV, "") == "1"


def _warn_once(what, kind, p, shape, e):
    import warnings
    key = (what, kind, type(e).__name__)
    if key not in _WARNED:
        _WARNED.add(key)
        msg = " ".join(str(e).split())[:200]
        warnings.warn(f"triton {what} kernel failed for kind={kind} p={p:g} q{tuple(shape)} ({type(e).__name__}: {msg}); "
                      "using the math backend for these calls", stacklevel=3)


def _math(kind, p):
    from model import AttnSpec  # here: model.py imports kernels
    return AttnSpec("lssa" if kind == "softplus" else "softmax", p)  # q arrives scaled: only stage 1 and p matter


@torch.library.custom_op("softplus_attn::triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_offset: int, p: float,
            kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        return forward(q, k, v, pos_offset, p, kind)
    except Exception as e:  # noqa: BLE001 - any compile / launch failure: fall back, never crash the run
        if _strict():
            raise
        _warn_once("forward", kind, p, q.shape, e)
        from kernels import chunked
        with torch.autocast(q.device.type, enabled=False):
            out = chunked.forward(q.float(), k.float(), v.float(), _math(kind, p), pos_offset, 256).to(v.dtype)
        nan = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)
        return out, nan, nan.clone(), nan.clone()


@_fwd_op.register_fake
def _fwd_fake(q, k, v, pos_offset, p, kind):
    B, H, Tq, D = q.shape
    stat = lambda: q.new_empty((B, H, Tq), dtype=torch.float32)
    return v.new_empty((B, H, Tq, D)), stat(), stat(), stat()


@torch.library.custom_op("softplus_attn::triton_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            S: torch.Tensor, M: torch.Tensor, Z: torch.Tensor, pos_offset: int, p: float,
            kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if S.numel() == 0 or not torch.isnan(S.view(-1)[0]):  # (NaN statistics: the forward fell back)
        try:
            return backward(dout, q, k, v, out, S, M, Z, pos_offset, p, kind)
        except Exception as e:  # noqa: BLE001
            if _strict():
                raise
            _warn_once("backward", kind, p, q.shape, e)
    from kernels import chunked
    with torch.autocast(q.device.type, enabled=False):
        grads = chunked.backward(dout.float(), q.float(), k.float(), v.float(), out.float(), _math(kind, p), pos_offset, 256,
                                 functional=True)
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v), strict=True))


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, S, M, Z, pos_offset, p, kind):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as backward() returns


def _setup_context(ctx, inputs, output):
    q, k, v, pos_offset, p, kind = inputs
    out, S, M, Z = output
    ctx.save_for_backward(q, k, v, out, S, M, Z)
    ctx.args = (pos_offset, p, kind)
    ctx.mark_non_differentiable(S, M, Z)


def _backward_op(ctx, dout, _dS, _dM, _dZ):
    q, k, v, out, S, M, Z = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, out, S, M, Z, *ctx.args)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


def triton_attention(q, k, v, pos_offset: int, p: float, kind: str = "softplus"):
    """Causal attention of prepared q (B, H, Tq, D) over k, v (B, H, Tk, D), query t at position pos_offset + t;
    differentiable w.r.t. q, k, v; output in v's dtype. p > 0: re-weighting (LSSAR with kind="softplus")."""
    return _fwd_op(q, k, v, int(pos_offset), float(p), str(kind))[0]
