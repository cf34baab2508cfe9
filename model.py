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
    return torch.where(s < -30.0, s, torch.log(F.softplus(s.clamp_min(-30.0))))


def _log_relu(s):
    # log(ReLU(s)); -inf (weight exactly 0) for s <= 0, with a finite unused branch for clean gradients
    return torch.where(s > 0, torch.log(s.clamp_min(1e-30)), float("-inf"))


@dataclass(frozen=True)
class Variant:
    qk_norm: bool   # l2-normalise q and k per head (q.k becomes a cosine)
    scale: object   # scale(N, d) -> multiplier of q.k for a query row with N visible keys
    logw: object    # logw(s, N) -> log of the (unnormalised) weight of scaled score s; None = identity (softmax)
    normalise: bool  # l1-normalise each row (sum_j weights = 1)


ATTN_VARIANTS = {
    "softmax": Variant(False, _inv_sqrt_d, None, True),
    "lssa": Variant(True, _log_d_log_n, lambda s, n: log_softplus(s), True),
    "ssmax": Variant(True, _log_d_log_n, None, True),
    "sigmoid": Variant(False, _inv_sqrt_d, lambda s, n: F.logsigmoid(s - torch.log(n)), False),
    "relu": Variant(False, _inv_sqrt_d, lambda s, n: _log_relu(s) - torch.log(n), False),
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


def _row_n(pos_offset, Tq, like):
    # N_i = absolute position + 1 of each query row, shaped to broadcast over (B, H, Tq, Tk); the weights are
    # computed in fp32 at least (fp64 when the inputs are fp64), also under bf16 autocast
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.arange(pos_offset + 1, pos_offset + Tq + 1, device=like.device, dtype=dtype).view(Tq, 1)


CHUNK_ELEMENTS = 2**21  # score-matrix elements per chunk: measured fastest on CPU (fits in cache, no mmap churn)


def _weight_chunks(q, k, var, p, pos_offset, chunk):
    """The attention weights (both stages) of chunks of at most `chunk` query rows (fewer when B*H*Tk is large),
    each against only the keys it can see: yields (first row, keys seen, w of shape (B, H, rows, keys)).
    Memory is O(chunk x Tk), never O(T^2), and a causal pass does half the work. Scores and weights are fp32
    (fp64 for fp64 inputs); callers run it with autocast off, as the p-th power of the re-weighting amplifies
    score errors ~p-fold."""
    B, H, Tq, d = q.shape
    rows = max(1, min(chunk, CHUNK_ELEMENTS // (B * H * k.shape[2])))
    n_all = _row_n(pos_offset, Tq, q)
    q, kt = q.to(n_all.dtype), k.to(n_all.dtype).transpose(-2, -1)
    for c0 in range(0, Tq, rows):
        n = n_all[c0:c0 + rows]
        tk = pos_offset + c0 + n.shape[0]  # keys beyond the chunk's last query are masked anyway: skip them
        visible = torch.arange(tk, device=q.device).view(1, tk) <= (n - 1)  # key j visible to row i iff j <= i
        s = (q[:, :, c0:c0 + rows] @ kt[..., :tk]) * var.scale(n, d)
        logw = s if var.logw is None else var.logw(s, n)
        logw = logw.masked_fill(~visible, float("-inf"))  # multiplicative mask: weight exactly 0
        if var.normalise:
            w = torch.softmax(logw, dim=-1)  # = w_ij / sum_j w_ij computed stably (row 0 always sees itself)
        else:
            w = torch.exp(logw)
        if p > 0:
            w = _reweight(w, n, p, pos_offset + c0)
        yield c0, tk, w


def _attn_math(q, k, v, var, p, pos_offset, chunk):
    """Exact reference backend: the weights chunk by chunk, times v."""
    with torch.autocast(q.device.type, enabled=False):
        return torch.cat([w.to(v.dtype) @ v[:, :, :tk] for _, tk, w in _weight_chunks(q, k, var, p, pos_offset, chunk)],
                         dim=2)


def _reweight(A, n, p, row0):
    """Stage 2: A'_ij = R_ij / sum_j R_ij, R_ij = ReLU(N_i A_ij - O_i)^p, in log space so p = 15 cannot
    overflow; a row whose R is all zero (exactly uniform A) gives weights 0 and so a zero output."""
    tc = A.shape[-2]
    rows = torch.arange(row0, row0 + tc, device=A.device).view(tc, 1)
    offset = (rows >= REWEIGHT_EXEMPT_ROWS).to(A.dtype)
    x = n * A - offset
    logr = torch.where(x > 0, p * torch.log(x.clamp_min(torch.finfo(A.dtype).tiny)), float("-inf"))
    m = logr.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf row: keep exp() at 0, not NaN
    r = torch.exp(logr - m)
    return r / r.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)


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


ATTN_BACKENDS = ("auto", "math", "sdpa")


def _prepare(q, k, attn, reweight_p, pos_offset):
    """Validate the call and apply QK-norm; returns (q, k, variant, p, pos_offset)."""
    name, p = resolve_attn(attn, reweight_p)
    var = ATTN_VARIANTS[name]
    Tq, Tk = q.shape[2], k.shape[2]
    pos_offset = Tk - Tq if pos_offset is None else int(pos_offset)
    if pos_offset < 0 or pos_offset + Tq > Tk:
        raise ValueError(f"pos_offset={pos_offset} with Tq={Tq} needs 0 <= pos_offset <= Tk - Tq = {Tk - Tq}")
    if var.qk_norm:  # in fp32 at least: a bf16 cosine is off by ~4e-3, i.e. ~0.1 in a score scaled by log(d)log(N)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k = F.normalize(q.to(acc), dim=-1), F.normalize(k.to(acc), dim=-1)
    return q, k, var, p, pos_offset


def causal_attention(q, k, v, attn, reweight_p=0.0, pos_offset=None, backend="auto", chunk=256):
    """Causal attention of the last Tq positions over Tk keys.

    q: (B, H, Tq, d), k, v: (B, H, Tk, d), after RoPE. Key j sits at absolute position j; query t at
    pos_offset + t (default Tk - Tq: the queries are the last Tq positions), and sees keys j <= its position;
    N = its position + 1. The same call serves a full forward (Tq = Tk) and KV-cache decoding (Tq < Tk).
    """
    q, k, var, p, pos_offset = _prepare(q, k, attn, reweight_p, pos_offset)
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    sdpa_ok = var.logw is None and var.normalise and p == 0
    if backend == "sdpa" and not sdpa_ok:
        raise NotImplementedError(f"backend 'sdpa' computes softmax-type attention only, not {attn} with "
                                  f"reweight_p={p}; use 'math' or 'auto'")
    if backend == "sdpa" or (backend == "auto" and sdpa_ok):
        return _attn_sdpa(q, k, v, var, pos_offset)
    return _attn_math(q, k, v, var, p, pos_offset, chunk)


@torch.no_grad()
def attention_weights(q, k, attn, reweight_p=0.0, pos_offset=None, chunk=256):
    """The weights causal_attention uses (after both stages), chunk by chunk, for diagnostics: yields
    (first query row, w) with w of shape (B, H, rows, keys seen by the chunk); never a full T x T matrix."""
    q, k, var, p, pos_offset = _prepare(q, k, attn, reweight_p, pos_offset)
    chunks = _weight_chunks(q, k, var, p, pos_offset, chunk)
    while True:
        with torch.autocast(q.device.type, enabled=False):  # per chunk: the caller's autocast state stays its own
            item = next(chunks, None)
        if item is None:
            return
        yield item[0], item[2]


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
    attn_backend: str = "auto"  # auto | math | sdpa
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
