"""
Fused Triton attention (forward + backward) for the repo's causal attention kinds:

  kind="softplus"         LSSA: w_tj = softplus(s_tj); with p > 0 LSSAR (LSSA + re-weighting, the headline p = 15)
  kind="exp"              softmax / SSMax: w_tj = exp(s_tj), with or without the same re-weighting
  kind="stickbreak"       stick-breaking (Tan et al. 2024): the keys before the row's own, nearest first, each taking
                          sigmoid(s) of what the nearer ones left; the rest goes to the row's own key
  kind="stickbreak_self"  the same with the row's own key first in the stick

The caller prepares the inputs (QK-norm and the per-row scale folded into q, see model.py), so the score of query
row t and key j is s_tj = q_t . k_j, plus ALiBi's -m_h (P_t - j) when the call has slopes, plus the forget gate's
c_t - c_j when it has a gate. Row t sits at absolute position P_t = pos_offset + t and sees the keys j <= P_t, or
under a window of W keys P_t - W < j <= P_t; N_t = min(P_t + 1, W) is the number of keys it sees (model.AttnSpec
row_n / first_key). Everything is accumulated in fp32; no T x T tensor is ever stored.

Base-2 units. `triton_attention` multiplies q by log2(e) (in PyTorch, once per call: O(T d), differentiable, so
autograd applies the factor to dq), and the gate's c and ALiBi's slopes likewise, so the kernels see
x_tj = s_tj log2(e). Every weight is then a power of two:
  exp       w = 2^(x - M)                          (M: the row max of x; FlashAttention's exp2 trick)
  softplus  w = log2(1 + 2^x) = softplus(s) / ln 2 = max(x, 0) + y L(y),  y = 2^-|x| in (0, 1]
and the softplus derivative is  dw/dx = sigmoid(s) = r (x >= 0) or y r (x < 0),  r = 1 / (1 + y) = R(y).
L and R are minimax polynomials on [0, 1] (POLY below): ONE exp2 per score (the MUFU unit) and the rest on the FMA
pipe, no log and no division per score; y L(y) keeps full relative accuracy for tiny y (L(0) = 1 / ln 2). The
weights of a row are all 1 / ln 2 times softplus: the factor cancels in every normalisation (A = w / S, and the
re-weighting's N w / S), so only the statistics S, M kept for the backward are in these units.
Polynomial degree by the precision of the dots: fp32 q, k (the exact path) L of degree 7 and R of degree 8; 16-bit
q, k, whose weights are rounded to 16 bits for the P @ V dot anyway (bf16: 2^-9 relative, fp16: 2^-12), degree 4
and 5. The whole softplus and sigmoid against float64, over every float32 input that matters
(`python -m kernels.sass --mode=accuracy`): max relative error 3.7e-7 and 5.6e-7 (a few ulp) with the fp32
polynomials, 5.7e-5 and 5.1e-5 with the 16-bit ones.

Forward (softplus, exp), one program per (block of query rows, batch x head), looping over the key blocks the rows
can see (blocks fully visible to every row run without a mask; the diagonal blocks, and under a window the blocks
that straddle its lower edge, with it; blocks wholly before the window are skipped):
  p = 0   one sweep: acc += w V, S += sum_j w; out = acc / S. Softplus needs no running max: QK-norm bounds
          |s| <= log(d) log(N) (~40 at d = 64, N = 16K), far from fp32 overflow or underflow. exp keeps
          FlashAttention's online row max M and rescales S and acc when M grows.
  p > 0   two sweeps. 1) S_t and the row max (of w for softplus; for exp the score max M, so w = 2^(x - M) <= 1).
          2) the re-weighted sweep, in ratio form, exactly as model.reweight (kernels/chunked.py calls it):
              x_tj = N_t w_tj / S_t - O_t            (O_t = 0 for positions < the spec's exempt rows, else 1)
              xm_t = max_j x_tj = N_t max_j w_tj / S_t - O_t    (x increases with w)
              u_tj = ReLU(x_tj) / xm_t = ReLU(N_t w_tj - O_t S_t) / (N_t max_j w_tj - O_t S_t),   R = u^p
          u lies in [0, 1], so u^15 cannot overflow (x^15 would: x reaches N_t), and R / sum_j R is unchanged.
          A row with xm_t <= 0 (an exactly uniform row with O_t = 1) has R = 0 and outputs exactly 0.
          The denominator is written as S_t * xm_t = N_t max w - O_t S_t: for an exactly uniform row (N_t equal
          weights summed exactly) it is exactly 0, with no rounding of a division in the way.
  Per-row statistics for the backward, (B, H, Tq) fp32: S (row sum of w), M (max w for softplus, max x for exp),
  Z (sum_j R; = S without re-weighting).
  ALiBi's bias m (j - P_t) is added per tile as m (j - n0) per key plus m (n0 - P_t) per row (n0: the tile's first
  key), so that the per-score term stays small (exact to the fp32 rounding of the score); the exp kind adds only the
  key term per score and moves the row term into the row max (2^(x + b - M) = 2^((x + m (j - n0)) - (M - m (n0 - P_t)))).

Backward (FlashAttention-2 style: the weights are recomputed block by block), delta_t = dout_t . out_t and
g_tj = dout_t . v_j - delta_t; the kernels produce dL/dx (x = q2 . k with q2 = q log2(e)):
  p = 0   dL/dw_tj = g_tj / S_t
  p > 0   dL/dw_tj = c_t (g_tj u_tj^(p-1) - m_t),  c_t = p a_t / Z_t,  a_t = N_t / (S_t xm_t),
          m_t = sum_k w_tk g_tk u_tk^(p-1) / S_t   (model.reweight_grad, same equations)
  dL/dx = dL/dw * dw/dx with dw/dx = sigmoid (softplus) or w ln 2 (exp, the ln 2 applied per row); dq2 = dL/dx K,
  dk = dL/dx^T Q2, dv = (R / Z)^T dout.
  Two kernels, deterministic (no atomics), as in Triton's fused-attention tutorial (python/tutorials/
  06-fused-attention.py: separate dK/dV and dQ loops):
  - dq, one program per query block, ONE sweep over its keys: m_t needs the whole row before any ds is known, but
    dq_t = c_t (sum_j g u^(p-1) w' k_j - m_t sum_j w' k_j), so the sweep accumulates m_t and both sums and
    finishes dq at the end (one extra dot per block instead of a second sweep). It stores m_t.
  - dk / dv, one program per key block, sweeping the query blocks that see it (under a window: only those whose
    rows reach back to it); it reads m_t (the m_t "preprocessing" sweep is thus the dq kernel itself).

Stick-breaking (its own three kernels, below the others), in base 2 with sp = log2(1 + 2^x) = softplus(s) / ln 2:
    A_tj = 2^(x_tj - sum_{k=j}^{P_t - 1} sp_tk)  (j < P_t),   rho_t = 2^(-sum_{k<P_t} sp_tk)  added to A_t,P_t
(stickbreak_self: the sums run to k = P_t and j <= P_t), the log of model.stickbreak's product, never the product of
(1 - sigmoid) itself. Rows are not normalised: they sum to 1 by construction.
  Forward: the keys nearest first, from the diagonal block back to key 0, carrying R_t = the sum of sp over the keys
  already visited; in a tile, the sum over the tile's nearer keys is a dot with a triangular matrix of ones
  (U_kj = 1 for k > j, on the tensor cores; its accumulator starts at sp + R in fp32), so A = 2^(x - that).
  The remainder rho = 2^-R goes to the row's own v at the end. The kernel stores R_t (the backward's rho) and the
  output in fp32 (the backward's delta must be the sum the kernels computed, see below).
  Backward: with g_tj = dout_t . v_j, every score's gradient is (z = s: natural units)
      dL/dz_tk = g_tk A_tk - sigmoid(z_tk) (delta_t - Q_tk),   Q_tk = sum_{j > k in the stick} g_tj A_tj
  (delta_t = dout_t . out_t = sum_j g_tj A_tj + rho_t dout_t . v_P_t: delta - Q is the sum over the keys farther
  than k and the remainder, the only prefix sum the derivative needs), so the nearest-first sweep needs only running
  suffix sums, Q like R. Q cancels against delta where the stick is used up, so delta must be the kernels' own sum:
  the forward keeps its output in fp32 and the backward sums A rounded to v's dtype, as the forward's P @ V dot
  took it. The dq kernel (one program per query block, nearest first, one sweep) stores R and Q at every key block
  it crosses, (2, B H, key blocks, Tq) fp32 (O(T^2 / BLOCK_N) memory: what a per-key-block program cannot rebuild
  without the keys between it and the row); the dk / dv kernel (one program per key block) reads them: no atomics,
  deterministic. (shawntan/stickbreaking-attention has a fused stick-breaking kernel whose backward adds dk, dv under
  a spin lock; this one shares no code with it.)

Loads: the head size D is a compile-time constant, so rows of q, k, v load as whole vectors (16-byte accesses that
Triton pipelines into shared memory), masked by row only; the dimension mask is compiled in only when D is not a
power of two.

Under TRITON_INTERPRET=1 (set below when there is no GPU) CPU tensors run through Triton's interpreter: exact
and slow, used by tests/test_triton.py. Block sizes are small there (16: fast, and it exercises the multi-block
logic). The GPU tiles in _config were chosen from the compiled code (kernels/sass.py: no spills, wgmma for 16-bit
dots on sm_90), not timed on a GPU.
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

KINDS = ("softplus", "exp", "stickbreak", "stickbreak_self")
STICK = ("stickbreak", "stickbreak_self")
MAX_HEAD_SIZE = 128  # the GPU block sizes below are sized for head sizes up to 128 (registers / shared memory)
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
_LN2 = tl.constexpr(LN2)
# The stick's in-tile sums take sp in fp16 on the 16-bit path (2^-11 relative: 8 times finer than bf16; softplus is
# >= 0 and rarely large). sp saturates there at fp16's largest value, 65504, instead of overflowing to inf (whose
# product with U's zeros would be NaN): a nearer key with sp that large leaves every farther one 2^-65504 = 0 of the
# stick either way, and the key's own term enters in fp32 (the dot's accumulator).
SB_CAP = 65504.0
_SB_CAP = tl.constexpr(SB_CAP)
# Compiled for a GPU (not under the interpreter, which cannot run inline PTX): a few conversions are written as PTX
# that handles two values per instruction (_f16_sat, _rounded)
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
# Minimax polynomials (relative error, on y in [0, 1], coefficients of y^0, y^1, ... as float32), fitted by
# `python -m kernels.sass --fit`; their measured errors in the module docstring (and tests/test_sass.py):
#   L(y) = log2(1 + y) / y    (softplus in base 2: max(x, 0) + y L(y))
#   R(y) = 1 / (1 + y)        (sigmoid: R or y R)
POLY = {
    "L7": (1.4426947832107544, -0.7213100790977478, 0.48006370663642883, -0.35339483618736267, 0.2560097277164459,
           -0.1553518921136856, 0.06360789388418198, -0.012319473549723625),
    "R8": (0.9999997615814209, -0.9999579787254333, 0.9988448619842529, -0.9874166250228882, 0.9286426305770874,
           -0.7588510513305664, 0.4707198441028595, -0.1857549101114273, 0.03377361595630646),
    "L4": (1.4426132440567017, -0.7169874310493469, 0.4418988525867462, -0.22711947560310364, 0.05965154618024826),
    "R5": (0.9999489784240723, -0.9962757229804993, 0.9534208178520203, -0.7705730199813843, 0.41793790459632874,
           -0.10448446124792099),
}
# as compile-time constants of the kernels (Triton reads module globals annotated tl.constexpr)
_L7_0, _L7_1, _L7_2, _L7_3, _L7_4, _L7_5, _L7_6, _L7_7 = (tl.constexpr(c) for c in POLY["L7"])
_R8_0, _R8_1, _R8_2, _R8_3, _R8_4, _R8_5, _R8_6, _R8_7, _R8_8 = (tl.constexpr(c) for c in POLY["R8"])
_L4_0, _L4_1, _L4_2, _L4_3, _L4_4 = (tl.constexpr(c) for c in POLY["L4"])
_R5_0, _R5_1, _R5_2, _R5_3, _R5_4, _R5_5 = (tl.constexpr(c) for c in POLY["R5"])


# -----------------------------------------------------------------------------
# elementwise pieces


@triton.jit
def _load_rows(base, rows, dims, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, EDGE: tl.constexpr):
    # (len(rows), BLOCK_D) tile of a contiguous (n_rows, D) matrix; EDGE: zeros for rows past n_rows (only blocks
    # that can reach the end need the row mask); dimensions past D are masked only when D < BLOCK_D
    ptrs = base + rows[:, None] * D + dims[None, :]
    if EDGE:
        if D == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (dims[None, :] < D), other=0.0)
    else:
        if D == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=dims[None, :] < D, other=0.0)
    return x


@triton.jit
def _store_rows(base, rows, dims, n_rows, D: tl.constexpr, x):
    mask = (rows[:, None] < n_rows) & (dims[None, :] < D)
    tl.store(base + rows[:, None] * D + dims[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _safe_inv(x):
    # 1 / x where x > 0, else 0 (a row without weight outputs 0 and gets no gradient); per row, not per score
    return tl.where(x > 0.0, 1.0 / tl.where(x > 0.0, x, 1.0), 0.0)


@triton.jit
def _log2_1p_over(y, FAST: tl.constexpr):
    # L(y) = log2(1 + y) / y by Horner (FMAs only)
    if FAST:
        r = _L4_4 * y + _L4_3
        r = r * y + _L4_2
        r = r * y + _L4_1
        r = r * y + _L4_0
    else:
        r = _L7_7 * y + _L7_6
        r = r * y + _L7_5
        r = r * y + _L7_4
        r = r * y + _L7_3
        r = r * y + _L7_2
        r = r * y + _L7_1
        r = r * y + _L7_0
    return r


@triton.jit
def _inv_1p(y, FAST: tl.constexpr):
    # R(y) = 1 / (1 + y) by Horner (FMAs only)
    if FAST:
        r = _R5_5 * y + _R5_4
        r = r * y + _R5_3
        r = r * y + _R5_2
        r = r * y + _R5_1
        r = r * y + _R5_0
    else:
        r = _R8_8 * y + _R8_7
        r = r * y + _R8_6
        r = r * y + _R8_5
        r = r * y + _R8_4
        r = r * y + _R8_3
        r = r * y + _R8_2
        r = r * y + _R8_1
        r = r * y + _R8_0
    return r


@triton.jit
def _softplus2(x, y, FAST: tl.constexpr):
    # log2(1 + 2^x) = max(x, 0) + y L(y) with y = 2^-|x|: x = -inf (masked) gives y = 0 and exactly 0
    return tl.maximum(x, 0.0) + y * _log2_1p_over(y, FAST)


@triton.jit
def _sigmoid2(x, y, FAST: tl.constexpr):
    # sigmoid(x ln 2) = 1 / (1 + 2^-x) = R(y) for x >= 0, y R(y) below (y = 2^-|x|; 0 where x = -inf)
    r = _inv_1p(y, FAST)
    return tl.where(x >= 0.0, r, y * r)


@triton.jit
def _visible(s, pos, cols, W, WINDOW: tl.constexpr, KEYS_FIRST: tl.constexpr):
    # -inf on the keys a row does not see: after its position and, under a window of W keys (WINDOW), at or before
    # pos - W. pos (rows,) of the tile's queries, cols (keys,); KEYS_FIRST: the transposed (keys x queries) tiles of
    # the dk / dv kernel
    if KEYS_FIRST:
        ok = cols[:, None] <= pos[None, :]
        if WINDOW:
            ok = ok & (cols[:, None] > (pos - W)[None, :])
    else:
        ok = cols[None, :] <= pos[:, None]
        if WINDOW:
            ok = ok & (cols[None, :] > (pos - W)[:, None])
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _scores(q, k, pos, cols, W, MASK: tl.constexpr, WINDOW: tl.constexpr, PREC: tl.constexpr):
    # q (BM, BD), k (BN, BD) -> x (BM, BN); with MASK, -inf on the keys the row does not see (_visible): every
    # weight below (softplus, exp, their derivatives, the re-weighting) is then exactly 0 there
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASK:
        s = _visible(s, pos, cols, W, WINDOW, False)
    return s


@triton.jit
def _gated(s, cq, Cb, cols, n_cols, MASK: tl.constexpr, GATE: tl.constexpr, KEYS_FIRST: tl.constexpr):
    # the forget gate's c_i - c_j (base 2) added to a tile of scores: cq (rows,) of the tile's queries, the keys'
    # from Cb + cols (masked past n_cols only on the diagonal blocks); KEYS_FIRST: the transposed (keys x queries)
    # tiles of the dk / dv kernel
    if GATE:
        if MASK:
            ck = tl.load(Cb + cols, mask=cols < n_cols, other=0.0)
        else:
            ck = tl.load(Cb + cols)
        if KEYS_FIRST:
            s = s + (cq[None, :] - ck[:, None])
        else:
            s = s + (cq[:, None] - ck[None, :])
    return s


@triton.jit
def _alibi(s, slope, cols, pos, n0, ALIBI: tl.constexpr, EXP: tl.constexpr, KEYS_FIRST: tl.constexpr):
    # ALiBi's m (j - P) (base 2: slope = m log2(e)) on a tile of scores, as m (j - n0) per key, small and added per
    # score, and r = m (n0 - P) per row (n0: the tile's first key). Returns (scores, r): the exp kind adds only the
    # key term per score and takes r into its row max (_shift); the softplus kinds add both. Without ALiBi r is 0.
    r = 0.0
    if ALIBI:
        c = slope * (cols - n0).to(tl.float32)
        r = slope * (n0 - pos).to(tl.float32)
        if KEYS_FIRST:
            s = s + c[:, None]
            if not EXP:
                s = s + r[None, :]
        else:
            s = s + c[None, :]
            if not EXP:
                s = s + r[:, None]
    return s, r


@triton.jit
def _shift(M, r, ALIBI: tl.constexpr, EXP: tl.constexpr):
    # the exp kind's row max M as seen by scores that lack ALiBi's row term r (_alibi): 2^(x + r - M) = 2^(x - (M - r))
    if ALIBI:
        if EXP:
            M = M - r
    return M


@triton.jit
def _weights(x, M, EXP: tl.constexpr, FAST: tl.constexpr):
    # stage 1: 2^(x - M) relative to the row max M (broadcast to x: M[:, None], or M[None, :] in the transposed
    # tiles of the dk / dv kernel), or log2(1 + 2^x); one exp2 per score either way
    if EXP:
        w = tl.exp2(x - M)
    else:
        w = _softplus2(x, tl.exp2(-tl.abs(x)), FAST)
    return w


@triton.jit
def _weights_slope(x, M, EXP: tl.constexpr, FAST: tl.constexpr):
    # (w, dw/dx) from one exp2: exp: (w, w), the ln 2 of d 2^x / dx applied per row by the caller (DW_ROW);
    # softplus: (log2(1 + 2^x), sigmoid) with sigmoid = R(y) for x >= 0 and y R(y) below (0 where masked)
    if EXP:
        w = tl.exp2(x - M)
        dw = w
    else:
        y = tl.exp2(-tl.abs(x))
        w = _softplus2(x, y, FAST)
        dw = _sigmoid2(x, y, FAST)
    return w, dw


@triton.jit
def _reweight_row(pos, S, M, W, EXP: tl.constexpr, EXEMPT: tl.constexpr, WINDOW: tl.constexpr):
    # per-row constants of the re-weighting (all (BM,)) for u = max(A1 w - A0, 0): with N_t (the keys row t sees:
    # P_t + 1, at most W under a window), O_t and inv = 1 / (S_t xm_t) = 1 / (N_t max w - O_t S_t) (0 for a row with
    # xm_t <= 0: R = 0 there), A1 = N_t inv (= the backward's a_t) and A0 = O_t S_t inv: one FMA and one max per score
    if WINDOW:
        N = tl.minimum(pos + 1, W).to(tl.float32)
    else:
        N = (pos + 1).to(tl.float32)
    OS = tl.where(pos >= EXEMPT, S, 0.0)
    if EXP:
        inv = _safe_inv(N - OS)  # max_j w = 2^(M - M) = 1
    else:
        inv = _safe_inv(N * M - OS)
    return N * inv, OS * inv


@triton.jit
def _ratio(w, A1, A0):
    # u = ReLU(x) / xm = ReLU(N w - O S) / (N max w - O S) = max(A1 w - A0, 0), in [0, 1]; A1, A0 broadcast to w
    return tl.maximum(w * A1 - A0, 0.0)


@triton.jit
def _upow(u, E: tl.constexpr, E_INT: tl.constexpr):
    # u^E for u >= 0 and 0 where u = 0 (the ReLU's zero, also for E <= 0). Called with E = p - 1:
    # R = u * _upow(u) = u^p and dR/du = p * _upow(u). A whole E (E_INT >= 0) by repeated squaring (no exp / log,
    # and exact-ish); otherwise exp2(E log2 u).
    pos = u > 0.0
    if E_INT == 0:
        r = tl.where(pos, 1.0, 0.0)
    elif E_INT > 0:  # u^E is 0 at u = 0 by itself: the product of the powers of two of E's bits
        r = u
        sq = u
        for i in tl.static_range(7):
            if (E_INT >> i) & 1:
                if E_INT & ((1 << i) - 1):  # a lower bit came first: multiply it in
                    r = r * sq
                else:
                    r = sq
            if (E_INT >> i) > 1:
                sq = sq * sq
    else:
        r = tl.where(pos, tl.exp2(E * tl.log2(tl.where(pos, u, 1.0))), 0.0)
    return r


@triton.jit
def _key_range(first, last, full, W, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    # (lo, mid) for a query block at positions first .. last whose keys [0, full) are causally visible to every row:
    # under a window the key blocks start at lo (the block of first - W + 1: earlier ones are seen by no row), and
    # [lo, mid) straddle the window's lower edge (masked), while the keys from last - W + 1 on are in every row's
    # window; without one lo = mid = 0
    if WINDOW:
        lo = (tl.maximum(first - W + 1, 0) // BLOCK_N) * BLOCK_N
        mid = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last - W + 1, 0), BLOCK_N) * BLOCK_N, lo), full)
    else:
        lo = 0
        mid = 0
    return lo, mid


# -----------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, cq, Cb, slope, A1, A0, lo, hi, Tk, W,
               STAGE: tl.constexpr, MASK: tl.constexpr, EXP: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
               FAST: tl.constexpr, GATE: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
               PREC_QK: tl.constexpr, PREC_V: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Key blocks lo, lo + BLOCK_N, .. < hi for one query block; acc (BM, BD), S, M, Z (BM,).
    STAGE 1: S and the row max only (LSSAR's first sweep); 2: also acc += w V (no re-weighting);
    3: acc += R V and Z += sum R, with the final S and M (LSSAR's second sweep). MASK: the blocks on the diagonal
    (causal mask, and rows that may pass the end) and those on a window's lower edge."""
    dims = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s = _scores(q, _load_rows(Kb, cols, dims, Tk, D, BLOCK_D, MASK), pos, cols, W, MASK, WINDOW, PREC_QK)
        s = _gated(s, cq, Cb, cols, Tk, MASK, GATE, False)
        s, r = _alibi(s, slope, cols, pos, n0, ALIBI, EXP, False)  # (BM, BN); exp: ALiBi's row term r kept apart
        if STAGE == 3:
            u = _ratio(_weights(s, _shift(M, r, ALIBI, EXP)[:, None], EXP, FAST), A1[:, None], A0[:, None])
            w = u * _upow(u, E, E_INT)  # R = u^p
            Z += tl.sum(w, 1)
        elif EXP:  # online max: what was summed against the previous max is rescaled (FlashAttention)
            mx = tl.max(s, 1)
            if ALIBI:
                mx = mx + r
            M_new = tl.maximum(M, mx)  # finite without a window: every row sees key 0, in the first block swept
            Ms = M_new
            if MASK:
                if WINDOW:  # a row that has seen no key yet (its window starts in a later block): nothing to rescale
                    Ms = tl.where(M_new > float("-inf"), M_new, 0.0)
            alpha = tl.exp2(M - Ms)
            w = tl.exp2(s - _shift(Ms, r, ALIBI, EXP)[:, None])
            S = S * alpha + tl.sum(w, 1)
            if STAGE == 2:
                acc = acc * alpha[:, None]
            M = M_new
        else:
            w = _weights(s, M[:, None], EXP, FAST)
            S += tl.sum(w, 1)
            if STAGE == 1:
                M = tl.maximum(M, tl.max(w, 1))
        if STAGE != 1:
            v = _load_rows(Vb, cols, dims, Tk, D, BLOCK_D, MASK)
            acc = tl.dot(w.to(v.dtype), v, acc, input_precision=PREC_V)
    return acc, S, M, Z


@triton.jit
def _fwd_sweeps(acc, S, M, Z, q, Kb, Vb, pos, cq, Cb, slope, A1, A0, lo, mid, full, hi, Tk, W,
                STAGE: tl.constexpr, EXP: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr, FAST: tl.constexpr,
                GATE: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr, PREC_QK: tl.constexpr,
                PREC_V: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # one pass over a query block's keys: [lo, mid) on the window's lower edge (masked; only under a window),
    # [mid, full) visible to every row (no mask), [full, hi) the diagonal (masked)
    if WINDOW:
        acc, S, M, Z = _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, cq, Cb, slope, A1, A0, lo, mid, Tk, W, STAGE, True, EXP,
                                  E, E_INT, FAST, GATE, ALIBI, WINDOW, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
    acc, S, M, Z = _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, cq, Cb, slope, A1, A0, mid, full, Tk, W, STAGE, False, EXP,
                              E, E_INT, FAST, GATE, ALIBI, WINDOW, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
    acc, S, M, Z = _fwd_sweep(acc, S, M, Z, q, Kb, Vb, pos, cq, Cb, slope, A1, A0, full, hi, Tk, W, STAGE, True, EXP,
                              E, E_INT, FAST, GATE, ALIBI, WINDOW, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
    return acc, S, M, Z


@triton.jit
def _fwd_kernel(Q, K, V, C, Slopes, Out, S_out, M_out, Z_out, Tq, Tk, off, H, W,
                REWEIGHT: tl.constexpr, EXP: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
                EXEMPT: tl.constexpr, FAST: tl.constexpr, GATE: tl.constexpr, ALIBI: tl.constexpr,
                WINDOW: tl.constexpr, PREC_QK: tl.constexpr, PREC_V: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    Kb, Vb = K + bh * Tk * D, V + bh * Tk * D
    q = _load_rows(Q + bh * Tq * D, rows, dims, Tq, D, BLOCK_D, True)  # (BM, BD), kept for all the sweeps
    pos = off + rows  # absolute positions
    Cb = C + bh * Tk  # the forget gate's c of this head's keys (base 2), when GATE
    cq = tl.load(Cb + pos, mask=rows < Tq, other=0.0) if GATE else pos
    slope = tl.load(Slopes + bh % H) if ALIBI else 0.0  # ALiBi's m_h log2(e)
    # keys [0, full) are causally visible to every row of the block; [full, hi) need the mask; keys >= hi to none
    full = ((off + m0 + 1) // BLOCK_N) * BLOCK_N
    hi = off + tl.minimum(m0 + BLOCK_M, Tq)
    lo, mid = _key_range(off + m0, hi - 1, full, W, BLOCK_N, WINDOW)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    S = tl.zeros([BLOCK_M], dtype=tl.float32)
    M = tl.full([BLOCK_M], float("-inf"), tl.float32)
    Z = tl.zeros([BLOCK_M], dtype=tl.float32)
    A1, A0 = S, S  # the re-weighting's row constants (unused without it)
    if REWEIGHT:
        acc, S, M, Z = _fwd_sweeps(acc, S, M, Z, q, Kb, Vb, pos, cq, Cb, slope, A1, A0, lo, mid, full, hi, Tk, W, 1, EXP,
                                   E, E_INT, FAST, GATE, ALIBI, WINDOW, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
        if WINDOW:
            if EXP:  # rows past Tq may see no key under a window: a finite max keeps their (unstored) weights finite
                M = tl.where(M > float("-inf"), M, 0.0)
        A1, A0 = _reweight_row(pos, S, M, W, EXP, EXEMPT, WINDOW)
        acc, S, M, Z = _fwd_sweeps(acc, S, M, Z, q, Kb, Vb, pos, cq, Cb, slope, A1, A0, lo, mid, full, hi, Tk, W, 3, EXP,
                                   E, E_INT, FAST, GATE, ALIBI, WINDOW, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
    else:
        acc, S, M, Z = _fwd_sweeps(acc, S, M, Z, q, Kb, Vb, pos, cq, Cb, slope, A1, A0, lo, mid, full, hi, Tk, W, 2, EXP,
                                   E, E_INT, FAST, GATE, ALIBI, WINDOW, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
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
def _dq_sweep(acc1, acc2, msum, gs0, gs1, q, do, M, delta, A1, A0, Kb, Vb, pos, cq, Cb, slope, lo, hi, Tk, W,
              MASK: tl.constexpr, REWEIGHT: tl.constexpr, EXP: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
              FAST: tl.constexpr, GATE: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
              PREC_QK: tl.constexpr, PREC_V: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Key blocks lo .. < hi of one query block. Accumulates acc1 = sum_j G_tj w'_tj k_j (BM, BD) with
    G = g (p = 0) or g u^(p-1) (p > 0); with re-weighting also acc2 = sum_j w'_tj k_j and msum = sum_j w_tj G_tj;
    with the gate the row sums of the two dots' left operands, gs0 = sum_j G w' and gs1 = sum_j w' (BM,) (for the
    score gradient's row sums: the gate's gradient at the query's position)."""
    dims = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(Kb, cols, dims, Tk, D, BLOCK_D, MASK)
        v = _load_rows(Vb, cols, dims, Tk, D, BLOCK_D, MASK)
        s = _gated(_scores(q, k, pos, cols, W, MASK, WINDOW, PREC_QK), cq, Cb, cols, Tk, MASK, GATE, False)  # (BM, BN)
        s, r = _alibi(s, slope, cols, pos, n0, ALIBI, EXP, False)
        w, dw = _weights_slope(s, _shift(M, r, ALIBI, EXP)[:, None], EXP, FAST)
        g = tl.dot(do, tl.trans(v), input_precision=PREC_V) - delta[:, None]  # dout_t . v_j - delta_t
        if REWEIGHT:
            g = g * _upow(_ratio(w, A1[:, None], A0[:, None]), E, E_INT)
            msum += tl.sum(w * g, 1)
            acc2 = tl.dot(dw.to(k.dtype), k, acc2, input_precision=PREC_QK)
        gdw = g * dw
        acc1 = tl.dot(gdw.to(k.dtype), k, acc1, input_precision=PREC_QK)
        if GATE:
            gs0 += tl.sum(gdw, 1)
            if REWEIGHT:
                gs1 += tl.sum(dw, 1)
    return acc1, acc2, msum, gs0, gs1


@triton.jit
def _dq_sweeps(acc1, acc2, msum, gs0, gs1, q, do, M, delta, A1, A0, Kb, Vb, pos, cq, Cb, slope, lo, mid, full, hi,
               Tk, W, REWEIGHT: tl.constexpr, EXP: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
               FAST: tl.constexpr, GATE: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
               PREC_QK: tl.constexpr, PREC_V: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               BLOCK_D: tl.constexpr):
    # the key ranges of the forward (_fwd_sweeps): [lo, mid) masked under a window, [mid, full), [full, hi) masked
    if WINDOW:
        acc1, acc2, msum, gs0, gs1 = _dq_sweep(acc1, acc2, msum, gs0, gs1, q, do, M, delta, A1, A0, Kb, Vb, pos, cq, Cb,
                                               slope, lo, mid, Tk, W, True, REWEIGHT, EXP, E, E_INT, FAST, GATE, ALIBI,
                                               WINDOW, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
    acc1, acc2, msum, gs0, gs1 = _dq_sweep(acc1, acc2, msum, gs0, gs1, q, do, M, delta, A1, A0, Kb, Vb, pos, cq, Cb,
                                           slope, mid, full, Tk, W, False, REWEIGHT, EXP, E, E_INT, FAST, GATE, ALIBI,
                                           WINDOW, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
    acc1, acc2, msum, gs0, gs1 = _dq_sweep(acc1, acc2, msum, gs0, gs1, q, do, M, delta, A1, A0, Kb, Vb, pos, cq, Cb,
                                           slope, full, hi, Tk, W, True, REWEIGHT, EXP, E, E_INT, FAST, GATE, ALIBI,
                                           WINDOW, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
    return acc1, acc2, msum, gs0, gs1


@triton.jit
def _bwd_dq_kernel(Q, K, V, C, Slopes, DO, S_in, M_in, Z_in, Delta, RowC, DQ, DCQ, Tq, Tk, off, H, W, plane,
                   REWEIGHT: tl.constexpr, EXP: tl.constexpr, P: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
                   EXEMPT: tl.constexpr, FAST: tl.constexpr, GATE: tl.constexpr, ALIBI: tl.constexpr,
                   WINDOW: tl.constexpr, PREC_QK: tl.constexpr, PREC_V: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq of one query block; also writes the per-row constants the dk / dv kernel reads (RowC: planes of
    `plane` = B H Tq floats): c = the factor of dL/dx (dw_row / S, or p a_t dw_row / Z_t), 1 / S or 1 / Z, and
    with re-weighting A1, A0 and m_t. With the gate also DCQ, the score gradient's row sums (B, H, Tq)."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    Kb, Vb = K + bh * Tk * D, V + bh * Tk * D
    q = _load_rows(Q + bh * Tq * D, rows, dims, Tq, D, BLOCK_D, True)  # (BM, BD)
    do = _load_rows(DO + bh * Tq * D, rows, dims, Tq, D, BLOCK_D, True)
    S, M, Z, delta = _load_row_stats(S_in, M_in, Z_in, Delta, bh, rows, Tq)
    pos = off + rows
    Cb = C + bh * Tk
    cq = tl.load(Cb + pos, mask=rows < Tq, other=0.0) if GATE else pos
    slope = tl.load(Slopes + bh % H) if ALIBI else 0.0
    A1, A0 = _reweight_row(pos, S, M, W, EXP, EXEMPT, WINDOW)
    full = ((off + m0 + 1) // BLOCK_N) * BLOCK_N  # as in the forward
    hi = off + tl.minimum(m0 + BLOCK_M, Tq)
    lo, mid = _key_range(off + m0, hi - 1, full, W, BLOCK_N, WINDOW)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    msum = tl.zeros([BLOCK_M], dtype=tl.float32)
    gs0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    gs1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1, acc2, msum, gs0, gs1 = _dq_sweeps(acc1, acc2, msum, gs0, gs1, q, do, M, delta, A1, A0, Kb, Vb, pos, cq, Cb,
                                            slope, lo, mid, full, hi, Tk, W, REWEIGHT, EXP, E, E_INT, FAST, GATE, ALIBI,
                                            WINDOW, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
    dw_row = _LN2 if EXP else 1.0  # d 2^x / dx = 2^x ln 2
    ok = rows < Tq
    i = bh * Tq + rows
    if REWEIGHT:
        rz = _safe_inv(Z)  # 0 for a row without weight
        c = (P * dw_row) * A1 * rz  # p a_t / Z_t
        m = msum / S  # m_t
        dq = c[:, None] * (acc1 - m[:, None] * acc2)
        dcq = c * (gs0 - m * gs1)
        tl.store(RowC + 2 * plane + i, A1, mask=ok)
        tl.store(RowC + 3 * plane + i, A0, mask=ok)
        tl.store(RowC + 4 * plane + i, m, mask=ok)
    else:
        rz = 1.0 / S
        c = dw_row * rz
        dq = acc1 * c[:, None]
        dcq = c * gs0
    if GATE:
        tl.store(DCQ + i, dcq, mask=ok)
    tl.store(RowC + i, c, mask=ok)
    tl.store(RowC + plane + i, rz, mask=ok)
    _store_rows(DQ + bh * Tq * D, rows, dims, Tq, D, dq)


@triton.jit
def _dkdv_sweep(dk, dv, dck, k, v, ck, Q, DO, C, M_in, Delta, RowC, plane, bh, cols, n0, slope, lo, hi, Tq, off, W,
                MASK: tl.constexpr, REWEIGHT: tl.constexpr, EXP: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
                FAST: tl.constexpr, GATE: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
                PREC_QK: tl.constexpr, PREC_V: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Query blocks lo .. < hi against one key block k, v (BN, BD): dk += ds^T q, dv += (w / S or R / Z)^T dout,
    with the dq kernel's per-row constants (no division here). The tiles are transposed (keys x queries, as in
    Triton's fused-attention tutorial): every dot then has the key block as its M dimension, the one wgmma (sm_90)
    splits over warpgroups of 64 rows. With the gate dck accumulates the score gradient's sums over the queries
    (BN,): minus the gate's gradient at the keys' positions."""
    dims = tl.arange(0, BLOCK_D)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(Q + bh * Tq * D, rows, dims, Tq, D, BLOCK_D, True)  # (BM, BD)
        do = _load_rows(DO + bh * Tq * D, rows, dims, Tq, D, BLOCK_D, True)
        ok = rows < Tq
        i = bh * Tq + rows
        M = tl.load(M_in + i, mask=ok, other=0.0)
        delta = tl.load(Delta + i, mask=ok, other=0.0)
        c = tl.load(RowC + i, mask=ok, other=0.0)
        rz = tl.load(RowC + plane + i, mask=ok, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC_QK)  # (BN, BM)
        if MASK:
            sT = _visible(sT, off + rows, cols, W, WINDOW, True)
        if GATE:  # c_i - c_j: the queries' c at their positions, the keys' c (ck) loaded by the caller
            sT = sT + (tl.load(C + off + rows, mask=ok, other=0.0)[None, :] - ck[:, None])
        sT, r = _alibi(sT, slope, cols, off + rows, n0, ALIBI, EXP, True)
        w, dw = _weights_slope(sT, _shift(M, r, ALIBI, EXP)[None, :], EXP, FAST)
        g = tl.dot(v, tl.trans(do), input_precision=PREC_V) - delta[None, :]  # (BN, BM): dout_t . v_j - delta_t
        if REWEIGHT:
            A1 = tl.load(RowC + 2 * plane + i, mask=ok, other=0.0)
            A0 = tl.load(RowC + 3 * plane + i, mask=ok, other=0.0)
            m = tl.load(RowC + 4 * plane + i, mask=ok, other=0.0)
            u = _ratio(w, A1[None, :], A0[None, :])
            du = _upow(u, E, E_INT)  # u^(p-1)
            a = u * du * rz[None, :]  # R / Z
            ds = c[None, :] * (g * du - m[None, :]) * dw
        else:
            a = w * rz[None, :]
            ds = g * c[None, :] * dw
        dv = tl.dot(a.to(do.dtype), do, dv, input_precision=PREC_V)
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PREC_QK)
        if GATE:
            dck += tl.sum(ds, 1)
    return dk, dv, dck


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, C, Slopes, DO, M_in, Delta, RowC, DK, DV, DCK, Tq, Tk, off, H, W, plane,
                     REWEIGHT: tl.constexpr, EXP: tl.constexpr, E: tl.constexpr, E_INT: tl.constexpr,
                     FAST: tl.constexpr, GATE: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
                     PREC_QK: tl.constexpr, PREC_V: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_rows(K + bh * Tk * D, cols, dims, Tk, D, BLOCK_D, True)  # (BN, BD), kept for the sweep
    v = _load_rows(V + bh * Tk * D, cols, dims, Tk, D, BLOCK_D, True)
    slope = tl.load(Slopes + bh % H) if ALIBI else 0.0
    # query rows t see key n0 from t = n0 - off on, and every key of the block from t = n0 + BLOCK_N - 1 - off on;
    # under a window, rows after n0 + BLOCK_N - 2 + W - off see none of it, and rows from n0 + W - off on do not see
    # all of it: [lo, b) masked (the diagonal), [b, mid) unmasked, [mid, hi) masked (the window's edge)
    lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
    full = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M, lo)
    if WINDOW:
        hi = tl.maximum(tl.minimum(Tq, n0 + BLOCK_N - 1 + W - off), lo)
        b = tl.minimum(full, hi)
        mid = tl.minimum(tl.maximum((tl.maximum(n0 + W - off, 0) // BLOCK_M) * BLOCK_M, b), hi)
    else:
        hi = Tq
        b = tl.minimum(full, Tq)
        mid = Tq
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dck = tl.zeros([BLOCK_N], dtype=tl.float32)
    Cb = C + bh * Tk
    ck = tl.load(Cb + cols, mask=cols < Tk, other=0.0) if GATE else dck
    dk, dv, dck = _dkdv_sweep(dk, dv, dck, k, v, ck, Q, DO, Cb, M_in, Delta, RowC, plane, bh, cols, n0, slope, lo, b,
                              Tq, off, W, True, REWEIGHT, EXP, E, E_INT, FAST, GATE, ALIBI, WINDOW, PREC_QK, PREC_V,
                              BLOCK_M, D, BLOCK_D)
    dk, dv, dck = _dkdv_sweep(dk, dv, dck, k, v, ck, Q, DO, Cb, M_in, Delta, RowC, plane, bh, cols, n0, slope, b, mid,
                              Tq, off, W, False, REWEIGHT, EXP, E, E_INT, FAST, GATE, ALIBI, WINDOW, PREC_QK, PREC_V,
                              BLOCK_M, D, BLOCK_D)
    if WINDOW:
        dk, dv, dck = _dkdv_sweep(dk, dv, dck, k, v, ck, Q, DO, Cb, M_in, Delta, RowC, plane, bh, cols, n0, slope, mid,
                                  hi, Tq, off, W, True, REWEIGHT, EXP, E, E_INT, FAST, GATE, ALIBI, WINDOW, PREC_QK,
                                  PREC_V, BLOCK_M, D, BLOCK_D)
    _store_rows(DK + bh * Tk * D, cols, dims, Tk, D, dk)
    _store_rows(DV + bh * Tk * D, cols, dims, Tk, D, dv)
    if GATE:
        tl.store(DCK + bh * Tk + cols, dck, mask=cols < Tk)


# -----------------------------------------------------------------------------
# stick-breaking: forward, dq, dk / dv (see the module docstring)


@triton.jit
def _tri(BLOCK_N: tl.constexpr, dtype: tl.constexpr, sign: tl.constexpr, KEYS_FIRST: tl.constexpr):
    # `sign` times the triangular matrix of ones that sums, for each key of a tile, the tile's nearer keys (those
    # after it): (x @ U)_j = sign sum_{k > j} x_k with U_kj = sign for k > j; transposed for the (keys x queries) tiles
    j = tl.arange(0, BLOCK_N)
    if KEYS_FIRST:
        u = tl.where(j[None, :] > j[:, None], sign, 0.0)
    else:
        u = tl.where(j[:, None] > j[None, :], sign, 0.0)
    return u.to(dtype)


@triton.jit
def _f16_sat(x):
    # x >= 0 in fp16, saturated at SB_CAP: on a GPU one cvt.rn.satfinite per two values (no separate min)
    if _PTX:
        r = tl.inline_asm_elementwise("cvt.rn.satfinite.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.float16,
                                      is_pure=True, pack=2)
    else:
        r = tl.minimum(x, _SB_CAP).to(tl.float16)
    return r


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    # fp32 x rounded to dtype (to nearest even, as the P @ V dot's operand takes it) and back to fp32; on a GPU one
    # conversion per two values, the halves unpacked with integer ops (not a conversion and a shift per value)
    if dtype == tl.float32:
        r = x
    elif _PTX and dtype == tl.bfloat16:
        r = tl.inline_asm_elementwise("{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $3, $2; shl.b32 $0, t, 16; "
                                      "and.b32 $1, t, 0xffff0000; }", "=r,=r,r,r", [x], dtype=tl.float32,
                                      is_pure=True, pack=2)
    elif _PTX:
        r = tl.inline_asm_elementwise("{ .reg .b32 t; .reg .f16 lo, hi; cvt.rn.f16x2.f32 t, $3, $2; "
                                      "mov.b32 {lo, hi}, t; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }", "=r,=r,r,r",
                                      [x], dtype=tl.float32, is_pure=True, pack=2)
    else:
        r = x.to(dtype).to(tl.float32)
    return r


@triton.jit
def _nearer(x, U, acc, PREC: tl.constexpr, KEYS_FIRST: tl.constexpr):
    # acc + for each key the (signed) sum of x over the tile's nearer keys (_tri), on the tensor cores, x in U's
    # dtype. fp32 x on a GPU (PREC tf32x3) as two tf32 dots, its high part (the top 10 mantissa bits, exact in tf32)
    # and the rest: U's entries are exact in tf32, so the third pass of tf32x3 would only add zeros
    if PREC == "tf32x3":
        hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        if KEYS_FIRST:
            r = tl.dot(U, x - hi, tl.dot(U, hi, acc, input_precision="tf32"), input_precision="tf32")
        else:
            r = tl.dot(x - hi, U, tl.dot(hi, U, acc, input_precision="tf32"), input_precision="tf32")
    elif KEYS_FIRST:
        r = tl.dot(U, x.to(U.dtype), acc, input_precision=PREC)
    else:
        r = tl.dot(x.to(U.dtype), U, acc, input_precision=PREC)
    return r


@triton.jit
def _sb_tile(a_in, b_in, pos, cols, R, Usp, MASK: tl.constexpr, SELF: tl.constexpr, FAST: tl.constexpr,
             PREC: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """One tile of stick-breaking weights: x = a_in . b_in (base 2; queries x keys, or keys x queries with
    KEYS_FIRST), -inf (MASK) on the keys outside each row's stick (at or after its position; after it with SELF);
    R (rows,) the sum of sp over the row's keys nearer than the tile; Usp: _tri(.., -1, ..). Returns (lb, sp, A):
        sp = log2(1 + 2^x),  lb = x - sp = log2 sigmoid(x ln 2),  A = 2^(lb - sum_{nearer keys in the tile} sp - R)
    (-inf, 0, 0 outside the stick). lb = x - sp is exact to x's rounding: sp differs from x only below x's ulp
    when 2^-|x| is that small."""
    x = tl.dot(a_in, tl.trans(b_in), input_precision=PREC)
    if MASK:
        if KEYS_FIRST:
            ok = cols[:, None] <= pos[None, :] if SELF else cols[:, None] < pos[None, :]
        else:
            ok = cols[None, :] <= pos[:, None] if SELF else cols[None, :] < pos[:, None]
        x = tl.where(ok, x, float("-inf"))
    sp = _softplus2(x, tl.exp2(-tl.abs(x)), FAST)
    lb = x - sp
    if FAST:  # the fp16 operand of the in-tile sums (SB_CAP)
        sp_in = _f16_sat(sp)
    else:
        sp_in = sp
    if KEYS_FIRST:
        acc = lb - R[None, :]
    else:
        acc = lb - R[:, None]
    a = tl.exp2(_nearer(sp_in, Usp, acc, PREC, KEYS_FIRST))  # Usp = -U; the dot's accumulator starts at lb - R, in fp32
    return lb, sp, a


@triton.jit
def _sb_fwd_sweep(acc, R, q, Kb, Vb, pos, Usp, top, count, Tk, MASK: tl.constexpr, SELF: tl.constexpr,
                  FAST: tl.constexpr, PREC_QK: tl.constexpr, PREC_V: tl.constexpr, BLOCK_N: tl.constexpr,
                  D: tl.constexpr, BLOCK_D: tl.constexpr):
    # `count` key blocks from the one at `top` down, nearest first: acc += A V, R += sum of sp
    dims = tl.arange(0, BLOCK_D)
    for t in range(count):
        n0 = top - t * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(Kb, cols, dims, Tk, D, BLOCK_D, MASK)
        _, sp, a = _sb_tile(q, k, pos, cols, R, Usp, MASK, SELF, FAST, PREC_QK, False)
        R += tl.sum(sp, 1)
        v = _load_rows(Vb, cols, dims, Tk, D, BLOCK_D, MASK)
        acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PREC_V)
    return acc, R


@triton.jit
def _sb_fwd_kernel(Q, K, V, Out, R_out, Tq, Tk, off, SELF: tl.constexpr, FAST: tl.constexpr, PREC_QK: tl.constexpr,
                   PREC_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """out (fp32) and R = sum of sp over each row's stick (the remainder is 2^-R) of one query block."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    Kb, Vb = K + bh * Tk * D, V + bh * Tk * D
    q = _load_rows(Q + bh * Tq * D, rows, dims, Tq, D, BLOCK_D, True)  # (BM, BD)
    pos = off + rows
    # keys [0, full) lie in every row's stick; the blocks from `top` (the one of the last row's key) down to full
    # need the mask
    hi = off + tl.minimum(m0 + BLOCK_M, Tq)
    top = ((hi - 1) // BLOCK_N) * BLOCK_N
    full = ((off + m0 + SELF) // BLOCK_N) * BLOCK_N
    Usp = _tri(BLOCK_N, tl.float16 if FAST else Q.dtype.element_ty, -1.0, False)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    R = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, R = _sb_fwd_sweep(acc, R, q, Kb, Vb, pos, Usp, top, tl.maximum((top - full) // BLOCK_N + 1, 0), Tk, True,
                           SELF, FAST, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
    acc, R = _sb_fwd_sweep(acc, R, q, Kb, Vb, pos, Usp, full - BLOCK_N, full // BLOCK_N, Tk, False,
                           SELF, FAST, PREC_QK, PREC_V, BLOCK_N, D, BLOCK_D)
    # the remainder 2^-R of the stick goes to the row's own value
    own = _load_rows(Vb, pos, dims, off + Tq, D, BLOCK_D, True).to(tl.float32)
    acc += tl.exp2(-R)[:, None] * own
    _store_rows(Out + bh * Tq * D, rows, dims, Tq, D, acc)
    tl.store(R_out + bh * Tq + rows, R, mask=rows < Tq)


@triton.jit
def _sb_grad(lb, a, g, Gd, Uga, FAST: tl.constexpr, PREC: tl.constexpr, KEYS_FIRST: tl.constexpr):
    # (g A, dL/dz) of a tile (natural units: the caller applies ln 2): dL/dz = g A - sigmoid(z) (delta - Q), where
    # Q_k = G (the sum of g A over the row's keys nearer than the tile) + the tile's nearer keys' g A (a bf16 operand
    # on the 16-bit path: g A can lie far below fp16's range), Gd = G - delta (rows,), and sigmoid(z) = 2^lb (one
    # exp2: cheaper here than the sigmoid polynomial)
    ga = g * a
    if KEYS_FIRST:
        qd = _nearer(ga.to(tl.bfloat16) if FAST else ga, Uga, tl.zeros_like(ga) + Gd[None, :], PREC, True)
    else:
        qd = _nearer(ga.to(tl.bfloat16) if FAST else ga, Uga, tl.zeros_like(ga) + Gd[:, None], PREC, False)
    return ga, ga + tl.exp2(lb) * qd


@triton.jit
def _sb_dq_sweep(dq, R, Gd, q, do, Kb, Vb, State, plane, pos, rows, Tq, Usp, Uga, top, count, Tk,
                 MASK: tl.constexpr, SELF: tl.constexpr, FAST: tl.constexpr, PREC_QK: tl.constexpr,
                 PREC_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KV: tl.constexpr, D: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    # `count` key blocks from `top` down (nearest first): dq += dL/dz K; R and Gd = G - delta the running sums of sp
    # and of g A (minus delta). Where a block ends a dk / dv block (BLOCK_KV keys, a multiple of BLOCK_N), R and Gd
    # (the sums over the keys after it) are stored for that block, before the block is swept
    dims = tl.arange(0, BLOCK_D)
    ok = rows < Tq
    for t in range(count):
        n0 = top - t * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        if BLOCK_KV == BLOCK_N:
            st = State + (n0 // BLOCK_N) * Tq + rows
            tl.store(st, R, mask=ok)
            tl.store(st + plane, Gd, mask=ok)
        else:
            end = n0 + BLOCK_N
            st = State + (end // BLOCK_KV - 1) * Tq + rows
            ends = ok & ((rows * 0 + end) % BLOCK_KV == 0)  # (rows,): every row, or none
            tl.store(st, R, mask=ends)
            tl.store(st + plane, Gd, mask=ends)
        k = _load_rows(Kb, cols, dims, Tk, D, BLOCK_D, MASK)
        v = _load_rows(Vb, cols, dims, Tk, D, BLOCK_D, MASK)
        lb, sp, a = _sb_tile(q, k, pos, cols, R, Usp, MASK, SELF, FAST, PREC_QK, False)
        a = _rounded(a, v.dtype)  # as the forward's P @ V took it: delta is a sum of these
        g = tl.dot(do, tl.trans(v), input_precision=PREC_V)  # (BM, BN) dout_t . v_j
        ga, ds = _sb_grad(lb, a, g, Gd, Uga, FAST, PREC_QK, False)
        R += tl.sum(sp, 1)
        Gd += tl.sum(ga, 1)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC_QK)
    return dq, R, Gd


@triton.jit
def _sb_dq_kernel(Q, K, V, DO, Delta, State, DQ, Tq, Tk, off, n_tiles, plane, SELF: tl.constexpr,
                  FAST: tl.constexpr, PREC_QK: tl.constexpr, PREC_V: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_KV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq (= dL/dq2) of one query block, and the running sums R, G - delta after each dk / dv key block (BLOCK_KV
    keys) its rows reach: State (2, B H, n_tiles, Tq), `plane` floats apart. BLOCK_N must be the forward's: the
    in-tile sums are then the forward's own dots, and the weights the forward's to the last bit."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    Kb, Vb = K + bh * Tk * D, V + bh * Tk * D
    q = _load_rows(Q + bh * Tq * D, rows, dims, Tq, D, BLOCK_D, True)
    do = _load_rows(DO + bh * Tq * D, rows, dims, Tq, D, BLOCK_D, True)
    delta = tl.load(Delta + bh * Tq + rows, mask=rows < Tq, other=0.0)
    pos = off + rows
    hi = off + tl.minimum(m0 + BLOCK_M, Tq)
    top = ((hi - 1) // BLOCK_N) * BLOCK_N
    full = ((off + m0 + SELF) // BLOCK_N) * BLOCK_N
    Usp = _tri(BLOCK_N, tl.float16 if FAST else Q.dtype.element_ty, -1.0, False)
    Uga = _tri(BLOCK_N, tl.bfloat16 if FAST else tl.float32, 1.0, False)
    Sb = State + bh * n_tiles * Tq
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    R = tl.zeros([BLOCK_M], dtype=tl.float32)
    Gd = -delta
    if BLOCK_KV != BLOCK_N:  # the dk / dv block of `top` ends after the rows' keys: nothing after it
        st = Sb + (top // BLOCK_KV) * Tq + rows
        tl.store(st, R, mask=rows < Tq)
        tl.store(st + plane, Gd, mask=rows < Tq)
    dq, R, Gd = _sb_dq_sweep(dq, R, Gd, q, do, Kb, Vb, Sb, plane, pos, rows, Tq, Usp, Uga, top,
                             tl.maximum((top - full) // BLOCK_N + 1, 0), Tk, True, SELF, FAST, PREC_QK, PREC_V, BLOCK_N,
                             BLOCK_KV, D, BLOCK_D)
    dq, R, Gd = _sb_dq_sweep(dq, R, Gd, q, do, Kb, Vb, Sb, plane, pos, rows, Tq, Usp, Uga, full - BLOCK_N,
                             full // BLOCK_N, Tk, False, SELF, FAST, PREC_QK, PREC_V, BLOCK_N, BLOCK_KV, D, BLOCK_D)
    _store_rows(DQ + bh * Tq * D, rows, dims, Tq, D, dq * _LN2)  # dL/dx = ln 2 dL/dz


@triton.jit
def _sb_dkdv_sweep(dk, dv, k, v, Q, DO, R_in, State, plane, bh, cols, n0, Usp, Uga, lo, hi, Tq, off,
                   MASK: tl.constexpr, SELF: tl.constexpr, FAST: tl.constexpr, PREC_QK: tl.constexpr,
                   PREC_V: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # query blocks lo .. < hi against one key block, in transposed (keys x queries) tiles as _dkdv_sweep; each row's
    # sums over its keys after the block come from the dq kernel (State: this block's, (Tq,) planes apart)
    dims = tl.arange(0, BLOCK_D)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        pos = off + rows
        q = _load_rows(Q + bh * Tq * D, rows, dims, Tq, D, BLOCK_D, True)  # (BM, BD)
        do = _load_rows(DO + bh * Tq * D, rows, dims, Tq, D, BLOCK_D, True)
        ok = rows < Tq
        if MASK:
            ok = ok & (pos + SELF > n0)  # rows whose stick reaches the block: the dq kernel stored their sums
        R = tl.load(State + rows, mask=ok, other=0.0)
        Gd = tl.load(State + plane + rows, mask=ok, other=0.0)
        lb, _, a = _sb_tile(k, q, pos, cols, R, Usp, MASK, SELF, FAST, PREC_QK, True)  # (BN, BM)
        a = _rounded(a, v.dtype)
        g = tl.dot(v, tl.trans(do), input_precision=PREC_V)
        ga, ds = _sb_grad(lb, a, g, Gd, Uga, FAST, PREC_QK, True)
        if MASK:  # the remainder 2^-R_total to the row's own key
            rho = tl.exp2(-tl.load(R_in + bh * Tq + rows, mask=rows < Tq, other=float("inf")))
            a = tl.where(cols[:, None] == pos[None, :], a + rho[None, :], a)
        dv = tl.dot(a.to(do.dtype), do, dv, input_precision=PREC_V)
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PREC_QK)
    return dk, dv


@triton.jit
def _sb_dkdv_kernel(Q, K, V, DO, R_in, State, DK, DV, Tq, Tk, off, n_tiles, plane, SELF: tl.constexpr,
                    FAST: tl.constexpr, PREC_QK: tl.constexpr, PREC_V: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk (= dL/dk of the base-2 scores' k) and dv of one key block; State's sums are per block of BLOCK_N keys
    (the dq kernel's BLOCK_KV)."""
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_rows(K + bh * Tk * D, cols, dims, Tk, D, BLOCK_D, True)  # (BN, BD)
    v = _load_rows(V + bh * Tk * D, cols, dims, Tk, D, BLOCK_D, True)
    # rows see a key of the block from t = n0 - off on; from t = n0 + BLOCK_N - off on every key of it lies in their
    # stick and none is their own (so no remainder lands in it): no mask
    lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
    full = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - off, 0), BLOCK_M) * BLOCK_M, lo)
    Usp = _tri(BLOCK_N, tl.float16 if FAST else Q.dtype.element_ty, -1.0, True)
    Uga = _tri(BLOCK_N, tl.bfloat16 if FAST else tl.float32, 1.0, True)
    Sb = State + (bh * n_tiles + n0 // BLOCK_N) * Tq
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _sb_dkdv_sweep(dk, dv, k, v, Q, DO, R_in, Sb, plane, bh, cols, n0, Usp, Uga, lo,
                            tl.minimum(full, Tq), Tq, off, True, SELF, FAST, PREC_QK, PREC_V, BLOCK_M, D, BLOCK_D)
    dk, dv = _sb_dkdv_sweep(dk, dv, k, v, Q, DO, R_in, Sb, plane, bh, cols, n0, Usp, Uga, full, Tq, Tq, off,
                            False, SELF, FAST, PREC_QK, PREC_V, BLOCK_M, D, BLOCK_D)
    _store_rows(DK + bh * Tk * D, cols, dims, Tk, D, dk * _LN2)
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


# GPU tiles (BLOCK_M query rows, BLOCK_N keys, warps, pipeline stages) by (kernel, 16-bit dots, head size <= 64,
# re-weighting), chosen from the compiled code (`python -m kernels.sass`, triton 3.9, sm_80 and sm_90): among
# candidates in the range of Triton's fused-attention tutorial, the tile of lowest estimated cycles per score on sm_90
# with no register spill on either architecture and wgmma for every 16-bit dot on sm_90 (M >= 64 rows per warpgroup:
# the dk / dv kernel's dots have the key block as M). Not timed on a GPU. fp32 q, k (tf32x3 dots, FP32_DOT) take
# small tiles: three dots per product and twice the operand registers. sb*: stick-breaking's kernels (its dq and
# dk / dv kernels share BLOCK_N: the dq kernel stores its sums per key block of that size).
TILES = {
    ("fwd", True, True, False): (128, 64, 8, 3), ("fwd", True, True, True): (128, 64, 8, 2),
    ("fwd", True, False, False): (128, 32, 8, 2), ("fwd", True, False, True): (64, 64, 4, 2),
    ("dq", True, True, False): (64, 64, 4, 2), ("dq", True, True, True): (64, 32, 4, 2),
    ("dq", True, False, False): (64, 32, 4, 2), ("dq", True, False, True): (64, 32, 4, 2),
    ("dkdv", True, True, False): (32, 64, 4, 2), ("dkdv", True, True, True): (32, 64, 4, 2),
    ("dkdv", True, False, False): (32, 64, 4, 2), ("dkdv", True, False, True): (16, 64, 4, 2),
    ("fwd", False, True, False): (32, 32, 4, 2), ("fwd", False, True, True): (32, 32, 4, 2),
    ("fwd", False, False, False): (16, 32, 4, 2), ("fwd", False, False, True): (16, 32, 4, 2),
    ("dq", False, True, False): (32, 32, 4, 2), ("dq", False, True, True): (16, 32, 4, 2),
    ("dq", False, False, False): (16, 32, 4, 2), ("dq", False, False, True): (16, 32, 4, 2),
    ("dkdv", False, True, False): (16, 32, 4, 2), ("dkdv", False, True, True): (32, 16, 8, 2),
    ("dkdv", False, False, False): (32, 16, 8, 2), ("dkdv", False, False, True): (32, 16, 8, 2),
    ("sbfwd", True, True, False): (128, 64, 8, 2), ("sbfwd", True, False, False): (64, 32, 4, 2),
    ("sbdq", True, True, False): (64, 64, 4, 1), ("sbdq", True, False, False): (64, 32, 4, 1),
    ("sbdkdv", True, True, False): (32, 64, 4, 2), ("sbdkdv", True, False, False): (16, 64, 4, 1),
    ("sbfwd", False, True, False): (32, 32, 4, 2), ("sbfwd", False, False, False): (32, 16, 4, 2),
    ("sbdq", False, True, False): (32, 32, 4, 2), ("sbdq", False, False, False): (16, 16, 4, 2),
    ("sbdkdv", False, True, False): (32, 32, 8, 1), ("sbdkdv", False, False, False): (32, 16, 8, 2),
}
# where the table's tile spills: with the forget gate (more live values per score), or on sm_80 (no wgmma there, so
# 32-row tiles lose nothing): the most specific entry applies (tags in the order gate, alibi, window, sm_80)
TILES_EXCEPT = {
    ("dq", True, True, False, "gate"): (64, 64, 4, 1), ("dq", True, False, True, "gate"): (64, 16, 4, 2),
    ("dq", True, False, True, "sm_80"): (32, 64, 4, 2), ("dq", True, False, True, "gate sm_80"): (32, 32, 4, 2),
    ("dkdv", True, False, True, "sm_80"): (32, 64, 4, 2),
    ("fwd", False, True, False, "gate"): (16, 32, 4, 2),
    ("dkdv", False, True, False, "gate"): (32, 16, 8, 2), ("dkdv", False, False, False, "gate"): (32, 16, 8, 1),
    ("sbdq", True, True, False, "sm_80"): (32, 64, 4, 2), ("sbdkdv", True, True, False, "sm_80"): (16, 64, 4, 2),
    ("sbdkdv", True, False, False, "sm_80"): (16, 32, 4, 2),
    ("sbfwd", False, False, False, "sm_80"): (16, 16, 4, 2),
    # ALiBi and windows: a few more live values per score (the bias terms, the window's row bounds)
    ("dkdv", True, False, False, "alibi"): (16, 64, 4, 2), ("dkdv", True, False, False, "window"): (16, 64, 4, 2),
    ("dkdv", True, False, True, "alibi sm_80"): (16, 32, 4, 2), ("dkdv", True, False, True, "window sm_80"): (16, 64, 4, 2),
    ("dq", True, True, False, "alibi sm_80"): (32, 64, 4, 2), ("dq", True, True, False, "window sm_80"): (32, 64, 4, 2),
    ("fwd", True, True, True, "alibi sm_80"): (128, 32, 8, 2), ("fwd", True, True, True, "window sm_80"): (128, 32, 8, 2),
    ("fwd", True, False, True, "window sm_80"): (64, 32, 4, 2), ("fwd", True, False, True, "alibi window"): (64, 64, 4, 1),
    ("fwd", False, True, False, "alibi sm_80"): (16, 32, 4, 2), ("dq", False, True, False, "gate window"): (16, 32, 4, 2),
    ("dkdv", False, False, False, "alibi"): (32, 16, 8, 1), ("dkdv", False, False, False, "window"): (32, 16, 8, 1),
    ("dkdv", False, False, True, "alibi"): (32, 16, 8, 1), ("dkdv", False, False, True, "window"): (32, 16, 8, 1),
    ("dq", True, False, True, "alibi window"): (64, 16, 4, 1), ("dq", True, False, True, "gate window"): (64, 16, 4, 1),
    ("dq", True, False, True, "alibi window sm_80"): (32, 32, 4, 2),
    ("dq", True, False, True, "gate window sm_80"): (32, 32, 4, 2),
}
FEATURES = ("gate", "alibi", "window", "sm_80")  # the tags of TILES_EXCEPT, in this order


def _tags(features):
    """Every combination of the features present, the most specific first: ('gate sm_80', 'gate', 'sm_80')."""
    import itertools
    return [" ".join(c) for n in range(len(features), 0, -1) for c in itertools.combinations(features, n)]


def tile_key(kernel, D, elt_size, p, arch, gate=False, kind="softplus", alibi=False, window=False):
    """The entry of TILES_EXCEPT (a 5-tuple: the most specific whose tag applies) or else TILES (a 4-tuple) that
    gives a kernel its GPU tile."""
    name = "sb" + kernel if kind in STICK else kernel
    key = (name, elt_size == 2, max(16, triton.next_power_of_2(D)) <= 64, p > 0)
    present = [f for f, on in zip(FEATURES, (gate, alibi, window, arch < 90), strict=True) if on]
    return next((key + (t,) for t in _tags(present) if key + (t,) in TILES_EXCEPT), key)


def _config(kernel, D, elt_size, p, arch, gate=False, kind="softplus", alibi=False, window=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a kernel: TILES (and TILES_EXCEPT) on a GPU of compute
    capability `arch` (80, 90, ...); 16 x 16 under the interpreter (fast there, and every test length crosses block
    edges)."""
    if _interpreting():
        return 16, 16, 1, 1
    key = tile_key(kernel, D, elt_size, p, arch, gate, kind, alibi, window)
    return TILES_EXCEPT[key] if len(key) == 5 else TILES[key]


def _arch(device):
    """Compute capability as one number (80, 90, ...) of a CUDA device; 90 otherwise (what sass.py compiles)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# input_precision of dots with fp32 operands: "ieee" (exact) under the interpreter; on a GPU "tf32x3" (three
# tensor-core passes, near-fp32: compiled for sm_90 plain "ieee" FMA loops spill registers at every tile size tried).
# The GPU acceptance run (.ci/gpu_acceptance) checks it against the float64 oracle at the fp32 tolerances.
FP32_DOT = "ieee" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "tf32x3"


def _prec(dtype):
    # fp32 operands: exact IEEE products (the tests compare with 1e-5); fp16 / bf16: tensor cores with fp32
    # accumulation (input_precision only matters for fp32 operands; "tf32" is triton's default)
    return FP32_DOT if dtype == torch.float32 else "tf32"


def constants(p, kind, exempt, qk_dtype, gate=False, alibi=False, window=0):
    """The kernels' compile-time constants for (p, kind, the spec's exempt rows, the dots' dtype, a forget gate,
    ALiBi, a window)."""
    fast = qk_dtype != torch.float32
    if kind in STICK:
        return dict(SELF=kind == "stickbreak_self", FAST=fast)
    e = p - 1.0
    e_int = int(e) if e == int(e) and 0 <= e < 128 else -1
    return dict(REWEIGHT=p > 0, EXP=kind == "exp", E=e, E_INT=e_int, EXEMPT=int(exempt), FAST=fast, GATE=bool(gate),
                ALIBI=bool(alibi), WINDOW=window > 0)


def supports(q, k, v, kind="softplus", p=0.0, gate=False, alibi=False, window=0):
    """None if these kernels compute this call, else a one-line reason."""
    if kind not in KINDS:
        return f"kind {kind!r} unknown; the triton kernels compute {', '.join(KINDS)}"
    if not (p >= 0 and math.isfinite(p)):
        return f"reweight p must be finite and >= 0, got {p}"
    if kind in STICK and (p > 0 or gate or alibi or window):
        return (f"the {kind} kernels take no re-weighting, forget gate, ALiBi or window (got p={p:g}, gate={gate}, "
                f"alibi={alibi}, window={window})")
    if window < 0:
        return f"window must be >= 0, got {window}"
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


def _check(q, k, v, pos_offset, p, kind, c=None, slopes=None, window=0):
    why = supports(q, k, v, kind, p, c is not None, slopes is not None, window)
    if why is None and not 0 <= pos_offset <= k.shape[2] - q.shape[2]:
        why = f"pos_offset={pos_offset} with Tq={q.shape[2]} needs 0 <= pos_offset <= Tk - Tq = {k.shape[2] - q.shape[2]}"
    if why is None and slopes is not None and tuple(slopes.shape) != (q.shape[1],):
        why = f"ALiBi's slopes must be ({q.shape[1]},) (one per head), got {tuple(slopes.shape)}"
    if why:
        raise ValueError(why)


def launches(q, k, v, pos_offset, p, kind, exempt, backward=None, c=None, arch=None, slopes=None, window=0):
    """The kernel launches of one forward call, or with backward = (dout, S, M, Z, delta) of one backward call
    (backward=True: placeholders of the right shapes): [(name, kernel, grid, arguments, compile-time arguments,
    outputs)], outputs allocated here (and named in `outputs`). c: the forget gate's c (B, H, Tk) in base 2, or
    None; slopes: ALiBi's (H,) in base 2, or None; window: W > 0 keys per row, 0 for all. forward / backward run
    exactly these; kernels/sass.py compiles them for a GPU without one (meta tensors are enough: only shapes,
    dtypes and alignment matter); arch: the compute capability to pick tiles for (default: q's device's)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dev, f32 = q.device, torch.float32
    arch, gate, alibi = _arch(dev) if arch is None else arch, c is not None, slopes is not None
    base = dict(**constants(p, kind, exempt, q.dtype, gate, alibi, window), PREC_QK=_prec(q.dtype), PREC_V=_prec(v.dtype),
                D=D, BLOCK_D=max(16, triton.next_power_of_2(D)))
    stat = lambda: torch.empty((B, H, Tq), dtype=f32, device=dev)
    tile = lambda name: _config(name, D, q.element_size(), p, arch, gate, kind, alibi, window > 0)
    if kind in STICK:
        return _stick_launches(q, k, v, pos_offset, backward, base, stat, tile)
    if not backward:
        out, S, M, Z = torch.empty((B, H, Tq, D), dtype=v.dtype, device=dev), stat(), stat(), stat()
        bm, bn, warps, stages = tile("fwd")
        meta = dict(base, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        args = (q, k, v, S if c is None else c, S if slopes is None else slopes, out, S, M, Z, Tq, Tk, pos_offset, H,
                window)  # (S in place of an absent gate or slopes: never read)
        return [("fwd", _fwd_kernel, (triton.cdiv(Tq, bm), B * H), args, meta, (out, S, M, Z))]
    if backward is True:
        backward = (torch.empty_like(v[:, :, :Tq]), stat(), stat(), stat(), stat())
    dout, S, M, Z, delta = backward
    rowc = torch.empty((5 if p > 0 else 2, B, H, Tq), dtype=f32, device=dev)  # the dq kernel's row constants
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dcq, dck = (stat(), torch.empty((B, H, Tk), dtype=f32, device=dev)) if gate else (S, S)
    c = S if c is None else c
    slopes = S if slopes is None else slopes
    plane = B * H * Tq
    bm, bn, warps, stages = tile("dq")
    dq_launch = ("dq", _bwd_dq_kernel, (triton.cdiv(Tq, bm), B * H),
                 (q, k, v, c, slopes, dout, S, M, Z, delta, rowc, dq, dcq, Tq, Tk, pos_offset, H, window, plane),
                 dict(base, P=float(p), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages), (dq, dcq))
    bm, bn, warps, stages = tile("dkdv")
    dkdv_meta = {key: x for key, x in base.items() if key != "EXEMPT"}
    dkdv_launch = ("dkdv", _bwd_dkdv_kernel, (triton.cdiv(Tk, bn), B * H),
                   (q, k, v, c, slopes, dout, M, delta, rowc, dk, dv, dck, Tq, Tk, pos_offset, H, window, plane),
                   dict(dkdv_meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages), (dk, dv, dck))
    return [dq_launch, dkdv_launch]


def _stick_launches(q, k, v, pos_offset, backward, base, stat, tile):
    """launches() for the stick-breaking kinds: the forward's outputs are (out fp32, R, and two unused statistics);
    the backward's S is the forward's R."""
    B, H, Tq, D = q.shape
    Tk, dev = k.shape[2], q.device
    if not backward:
        out, R = torch.empty((B, H, Tq, D), dtype=torch.float32, device=dev), stat()
        bm, bn, warps, stages = tile("fwd")
        meta = dict(base, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        return [("fwd", _sb_fwd_kernel, (triton.cdiv(Tq, bm), B * H), (q, k, v, out, R, Tq, Tk, pos_offset), meta,
                 (out, R, stat(), stat()))]
    if backward is True:
        backward = (torch.empty_like(v[:, :, :Tq]), stat(), stat(), stat(), stat())
    dout, R, _, _, delta = backward
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qm, qn, qw, qs = tile("dq")
    km, kn, kw, ks = tile("dkdv")
    fn = tile("fwd")[1]
    assert qn == fn and kn % qn == 0, f"stick-breaking's BLOCK_N: forward {fn} = dq {qn}, dividing dk / dv's {kn}"
    n_tiles = triton.cdiv(Tk, kn)
    state = torch.empty((2, B * H, n_tiles, Tq), dtype=torch.float32, device=dev)  # R, G - delta before each key block
    plane = B * H * n_tiles * Tq
    dq_launch = ("dq", _sb_dq_kernel, (triton.cdiv(Tq, qm), B * H),
                 (q, k, v, dout, delta, state, dq, Tq, Tk, pos_offset, n_tiles, plane),
                 dict(base, BLOCK_M=qm, BLOCK_N=qn, BLOCK_KV=kn, num_warps=qw, num_stages=qs), (dq, None))
    dkdv_launch = ("dkdv", _sb_dkdv_kernel, (n_tiles, B * H),
                   (q, k, v, dout, R, state, dk, dv, Tq, Tk, pos_offset, n_tiles, plane),
                   dict(base, BLOCK_M=km, BLOCK_N=kn, num_warps=kw, num_stages=ks), (dk, dv, None))
    return [dq_launch, dkdv_launch]


def _run(launch):
    _, kernel, grid, args, meta, _ = launch
    kernel[grid](*args, **meta)


def forward(q, k, v, pos_offset, p, kind="softplus", exempt=3, c=None, slopes=None, window=0):
    """q2 (B, H, Tq, D) prepared and in base-2 units (q log2(e), see triton_attention), k, v (B, H, Tk, D), c the
    forget gate's (B, H, Tk) fp32 in base 2 or None, slopes ALiBi's (H,) fp32 in base 2 or None, window W > 0 or 0
    -> (out (B, H, Tq, D) in v's dtype (fp32 for stick-breaking), S, M, Z (B, H, Tq) fp32 row statistics for
    `backward`). q, k of one dtype."""
    _check(q, k, v, pos_offset, p, kind, c, slopes, window)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    [launch] = launches(q, k, v, pos_offset, p, kind, exempt, c=None if c is None else c.contiguous(),
                        slopes=None if slopes is None else slopes.float().contiguous(), window=window)
    if q.numel():
        _run(launch)
    return launch[5]


def backward(dout, q, k, v, out, S, M, Z, pos_offset, p, kind="softplus", exempt=3, c=None, slopes=None, window=0):
    """Gradients (dq2, dk, dv, dc) of `forward` for the output gradient dout (B, H, Tq, D), in q's, k's, v's
    dtypes; dc (B, H, Tk) fp32 the gate's, None without one."""
    _check(q, k, v, pos_offset, p, kind, c, slopes, window)
    if q.numel() == 0 or k.numel() == 0:  # no query rows, keys or heads: nothing to launch
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), None if c is None else torch.zeros_like(c)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(v.dtype).contiguous()
    delta = (dout.float() * out.float()).sum(dim=-1)  # (B, H, Tq): sum_j w_tj dL/dw_tj = dout_t . out_t
    dq_launch, dkdv_launch = launches(q, k, v, pos_offset, p, kind, exempt, backward=(dout, S, M, Z, delta),
                                      c=None if c is None else c.contiguous(),
                                      slopes=None if slopes is None else slopes.float().contiguous(), window=window)
    _run(dq_launch)
    _run(dkdv_launch)
    (dq, dcq), (dk, dv, dck) = dq_launch[5], dkdv_launch[5]
    dc = None
    if c is not None:  # row sums at the queries' positions, minus column sums at the keys'
        dc = -dck
        dc[..., pos_offset:pos_offset + q.shape[2]] += dcq
    return dq, dk, dv, dc


# -----------------------------------------------------------------------------
# autograd + torch.compile: two custom ops, opaque to the compiler (no graph breaks)


# A kernel that fails to compile or launch on the user's GPU must not crash a training run: the op warns once
# (kind, shape, error) and computes the call with the math backend (kernels/chunked.py) instead, in the op itself,
# so that this also holds inside torch.compile'd code. NaN row statistics tell the backward to do the same.
# With SOFTPLUS_ATTN_STRICT=1 in the environment the failure is raised instead: the GPU tests and the acceptance
# run set it, so that a kernel that does not work on a GPU fails them rather than passing on the math fallback.
_WARNED = set()
STRICT_ENV = "SOFTPLUS_ATTN_STRICT"
MATH_ATTN = {"softplus": "lssa", "exp": "softmax", "stickbreak": "stickbreak", "stickbreak_self": "stickbreak_self"}


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


def _math(kind, p, exempt, gate, alibi, window):
    """The spec the math backend computes the kernels' call with: q arrives scaled, so only stage 1 (or the stick),
    p, the gate, ALiBi (the spec's own slopes, which the caller handed over in base 2) and the window matter (the
    exempt rows are the spec class's own)."""
    import kernels
    spec = kernels.make_spec(MATH_ATTN[kind], p, gate=gate, alibi=alibi, window=window)
    assert spec.exempt_rows == exempt, (spec.exempt_rows, exempt)
    return spec


def _natural(q2, c):
    """q2 and the gate's c in base 2 (the kernels' units) back in natural ones, fp32, for the math backend."""
    return q2.float() * LN2, None if c is None else c * LN2


def _out_dtype(kind, v):
    # stick-breaking's forward keeps its output in fp32 (the backward's delta is taken from it); triton_attention
    # casts it to v's dtype
    return torch.float32 if kind in STICK else v.dtype


@torch.library.custom_op("softplus_attn::triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None, slopes: torch.Tensor | None,
            pos_offset: int, p: float, kind: str, exempt: int,
            window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        return forward(q, k, v, pos_offset, p, kind, exempt, c, slopes, window)
    except Exception as e:  # noqa: BLE001 - any compile / launch failure: fall back, never crash the run
        if _strict():
            raise
        _warn_once("forward", kind, p, q.shape, e)
        from kernels import chunked
        qn, cn = _natural(q, c)
        with torch.autocast(q.device.type, enabled=False):
            out = chunked.forward(qn, k.float(), v.float(), _math(kind, p, exempt, c is not None, slopes is not None,
                                                                  window), pos_offset, 256, gate=cn)
        nan = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)
        return out.to(_out_dtype(kind, v)), nan, nan.clone(), nan.clone()


@_fwd_op.register_fake
def _fwd_fake(q, k, v, c, slopes, pos_offset, p, kind, exempt, window):
    B, H, Tq, D = q.shape
    stat = lambda: q.new_empty((B, H, Tq), dtype=torch.float32)
    return v.new_empty((B, H, Tq, D), dtype=_out_dtype(kind, v)), stat(), stat(), stat()


@torch.library.custom_op("softplus_attn::triton_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            S: torch.Tensor, M: torch.Tensor, Z: torch.Tensor, c: torch.Tensor | None, slopes: torch.Tensor | None,
            pos_offset: int, p: float, kind: str, exempt: int,
            window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if S.numel() == 0 or not torch.isnan(S.view(-1)[0]):  # (NaN statistics: the forward fell back)
        try:
            dq, dk, dv, dc = backward(dout, q, k, v, out, S, M, Z, pos_offset, p, kind, exempt, c, slopes, window)
            return dq, dk, dv, q.new_zeros(0) if dc is None else dc
        except Exception as e:  # noqa: BLE001
            if _strict():
                raise
            _warn_once("backward", kind, p, q.shape, e)
    from kernels import chunked
    qn, cn = _natural(q, c)
    with torch.autocast(q.device.type, enabled=False):
        dqn, dk, dv, dcn = chunked.backward(dout.float(), qn, k.float(), v.float(), out.float(),
                                            _math(kind, p, exempt, c is not None, slopes is not None, window),
                                            pos_offset, 256, functional=True, gate=cn)
    # q2 = q log2(e) (and c2 = c log2(e)) carry the scores in base 2: dL/dq2 = ln 2 dL/dq
    dq, dk, dv = (g.to(x.dtype) for g, x in zip((dqn * LN2, dk, dv), (q, k, v), strict=True))
    return dq, dk, dv, q.new_zeros(0) if dcn is None else dcn * LN2


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, S, M, Z, c, slopes, pos_offset, p, kind, exempt, window):
    # contiguous, as backward() returns; the gate's gradient empty without a gate (an op returns tensors)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), (q.new_zeros(0) if c is None
                                                                              else c.new_empty(c.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, c, slopes, pos_offset, p, kind, exempt, window = inputs
    out, S, M, Z = output
    ctx.save_for_backward(q, k, v, out, S, M, Z, c, slopes)
    ctx.args = (pos_offset, p, kind, exempt, window)
    ctx.mark_non_differentiable(S, M, Z)


def _backward_op(ctx, dout, _dS, _dM, _dZ):
    q, k, v, out, S, M, Z, c, slopes = ctx.saved_tensors
    dq, dk, dv, dc = _bwd_op(dout, q, k, v, out, S, M, Z, c, slopes, *ctx.args)
    return dq, dk, dv, None if c is None else dc, None, None, None, None, None, None


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


def triton_attention(q, k, v, pos_offset: int, p: float, kind: str = "softplus", exempt: int = 3, dots=None,
                     gate=None, alibi=None, window: int = 0):
    """Causal attention of prepared q (B, H, Tq, D) over k, v (B, H, Tk, D), query t at position pos_offset + t;
    differentiable w.r.t. q, k, v (and gate); output in v's dtype. p > 0: re-weighting (LSSAR with
    kind="softplus"), rows at positions < exempt with offset 0. gate: the forget gate's c (B, H, Tk) (scores gain
    c_i - c_j), or None. alibi: ALiBi's slopes m_h (H,) (scores gain -m_h (i - j); fixed, no gradient), or None.
    window: W > 0 keys per row (P - W < j <= P), 0 for all. dots: the dtype of the q . k dots (default: q's and k's
    common dtype); q (and c, the slopes) are multiplied by log2(e) in fp32 before the cast, so the scores reach the
    kernels in base 2 with one rounding."""
    dt = dots or torch.promote_types(q.dtype, k.dtype)
    q2 = (q.float() * LOG2E).to(dt)
    c2 = None if gate is None else gate.float() * LOG2E
    m2 = None if alibi is None else alibi.detach().float() * LOG2E
    out = _fwd_op(q2, k.to(dt), v, c2, m2, int(pos_offset), float(p), str(kind), int(exempt), int(window))[0]
    return out.to(v.dtype)
