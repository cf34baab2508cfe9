"""
The whole GPT in one file, with a switchable attention normalisation.

Read top to bottom:
  0. GPTConfig, the model's configuration
  1. the attention variants (the formulas: one registry entry each) and the canonical attention spec
  2. the re-weighting (stage 2), written once
  3. `causal_attention`, the one entry point, and a plain reference implementation of it
  4. RoPE, the GPT and its KV cache

Attention is computed in the paper's two stages (arXiv 2501.13428; docs/attention.md):
  1. normalisation: the scores of query row i become weights over the keys j <= i
     (softmax, LSSA = length-scaled softplus, SSMax, sigmoid, ReLU)
  2. sharpening (optional, `reweight_p` > 0): A'_ij ~ ReLU(N_i * A_ij - O_i) ** p   (LSSAR = LSSA + this)
How it is computed (chunked math, SDPA, flex, fused Triton kernels) lives in kernels/, which receives only the
canonical spec resolved here.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from torch.nn import functional as F

import kernels

# -----------------------------------------------------------------------------
# 0. the model's configuration (stored, canonical, in every checkpoint)


@dataclass
class GPTConfig:
    block_size: int = 1024      # training context; rope/none models may be run longer, learned ones may not
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attn: str = "softmax"       # a variant of VARIANTS (or a shorthand such as 'lssar', stored resolved)
    reweight_p: float = 0.0     # > 0: re-weighting stage with this power (LSSAR: attn='lssa', reweight_p=15)
    pos: str = "rope"           # rope | learned | none | alibi
    gate: str = "none"          # none | forget: a per-head forget gate per layer adds c_i - c_j to every score
                                # (the Forgetting Transformer, Lin et al. 2025; FoX = softmax, gate='forget', pos='none')
    gate_bias: float = 0.0      # the forget gates' initial bias b: f = sigmoid(w . x + b) starts near sigmoid(b); 0 (the
                                # FoX paper's init): f = 1/2, a weight that halves per step back; 4: f = 0.982, e^-1 at
                                # 55 steps back (the retention an LSTM's forget bias or FoX's decay-time init gives)
    window: int = 0             # > 0: sliding-window attention, query i sees the keys i - window < j <= i
    layers: str = ""            # a spec per layer (a hybrid stack), e.g. "3*softmax:window=16,softmax:pos=none:temp=logn"
                                # repeated to n_layer (parse_layers); "" = every layer as attn, pos, gate, window say
    length_temp: str = "none"   # the global layers' length temperature: none | logn | irope (LENGTH_TEMPS)
    temp_floor: int = 0         # irope's floor_scale; 0 = block_size
    temp_scale: float = 0.1     # irope's attn_scale
    rope_base: float = 10000.0
    rope_scaling: str = "none"  # evaluation-time RoPE extension: none | pi | ntk | yarn (rope_inv_freq)
    rope_factor: float = 0.0    # its factor s; 0 = per evaluated length: max(1, length / block_size)
    logn_scale: bool = False    # the older spelling of length_temp='logn' (stored as that: canonical False)
    attn_backend: str = "auto"  # auto | reference | math | sdpa | flex | triton (see kernels/)
    attn_chunk: int = 256       # query rows per chunk in the math backend (memory O(chunk x T))
    attn_dots: str = "auto"     # the q . k dots: auto (kernels.dots_dtype: 16 bits under autocast) | fp32 | bf16 | fp16: q, k
                                # rounded to 16 bits after `prepare` (the GPU's tensor-core inputs; elsewhere an exact
                                # emulation of them: products and sums in fp32)

    def __post_init__(self):
        """Resolve the attention to its canonical form (stored so in checkpoints) and validate; errors name the fix."""
        self.attn, self.reweight_p = canonical_attn(self.attn, self.reweight_p)
        if self.pos not in ("rope", "learned", "none", "alibi"):
            raise ValueError(f"unknown pos={self.pos!r}; choose rope, learned, none or alibi")
        if self.gate not in ("none", "forget"):
            raise ValueError(f"unknown gate={self.gate!r}; choose none or forget")
        if self.length_temp not in LENGTH_TEMPS:
            raise ValueError(f"unknown length_temp={self.length_temp!r}; choose one of {', '.join(LENGTH_TEMPS)}")
        if self.logn_scale:  # the older spelling, canonical as length_temp='logn'
            if self.length_temp not in ("none", "logn"):
                raise ValueError(f"logn_scale=True is length_temp='logn'; this config also sets length_temp="
                                 f"{self.length_temp!r}: keep one of them")
            self.length_temp, self.logn_scale = "logn", False
        if isinstance(self.temp_floor, bool) or not isinstance(self.temp_floor, int) or self.temp_floor < 0 \
                or not self.temp_scale > 0:
            raise ValueError(f"temp_floor must be a whole number >= 0 (0 = block_size) and temp_scale > 0, got "
                             f"{self.temp_floor!r}, {self.temp_scale!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"unknown rope_scaling={self.rope_scaling!r}; choose one of {', '.join(ROPE_SCALINGS)}")
        if not (self.rope_factor == 0 or self.rope_factor >= 1):
            raise ValueError(f"rope_factor must be 0 (per evaluated length) or >= 1, got {self.rope_factor}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        self._specs = self._layer_specs()  # validates every layer's spec (e.g. ALiBi on a variant with its own bias)
        if not math.isfinite(self.gate_bias):
            raise ValueError(f"gate_bias={self.gate_bias!r}: the forget gates' initial bias is a finite number (0 = f 1/2, "
                             "4 = f 0.98)")
        if self.gate_bias != 0 and not any(sp.gate for sp in self._specs):
            raise ValueError(f"gate_bias={self.gate_bias!r} is the forget gates' initial bias; no layer of this model has "
                             "one: add gate=forget (or a layer with it), or drop gate_bias")
        if self.layers:  # canonical: the pattern states every layer; the model-level defaults it took are reset
            if (self.attn, self.reweight_p) != ("softmax", 0.0):
                raise ValueError(f"attn={self.attn!r} reweight_p={self.reweight_p:g} describe a uniform stack; with "
                                 "layers= every group names its own attention (and reweight_p): drop attn / reweight_p")
            self.layers = layers_text(self._specs)
            self.attn, self.reweight_p, self.pos, self.gate, self.window, self.length_temp = \
                "softmax", 0.0, "rope", "none", 0, "none"
        if self.rope_scaling != "none" and not any(sp.rope for sp in self._specs):
            raise ValueError(f"rope_scaling={self.rope_scaling!r} extends RoPE; no layer of this model has pos='rope'")
        if any(sp.rope for sp in self._specs) and (self.n_embd // self.n_head) % 2:
            raise ValueError("RoPE needs an even head size (n_embd / n_head)")
        if self.attn_dots not in kernels.DOTS:
            raise ValueError(f"unknown attn_dots={self.attn_dots!r}; choose one of {', '.join(kernels.DOTS)}")
        if self.attn_backend not in ("reference", *kernels.BACKENDS):
            raise ValueError(f"unknown attn_backend={self.attn_backend!r}; choose one of "
                             f"{', '.join(('reference', *kernels.BACKENDS))}")

    @property
    def _temp_floor(self):
        return self.temp_floor or self.block_size

    def _layer_specs(self):
        """One AttnSpec per layer: the pattern's (parse_layers), or every layer as the model-level keys say."""
        if self.pos == "learned" and self.layers:
            raise ValueError("layers= gives each layer its own position code (rope, none, alibi); pos='learned' adds one "
                             "embedding to the input of all of them: use pos=rope, none or alibi with layers=")
        default = dict(pos="none" if self.pos == "learned" else self.pos, gate=self.gate, window=self.window,
                       temp=self.length_temp)
        if self.layers:
            specs = parse_layers(self.layers, self.n_layer, default, self.block_size, self._temp_floor, self.temp_scale)
        else:
            specs = [layer_spec(self.attn, self.reweight_p, **default, block_size=self.block_size,
                                temp_floor=self._temp_floor, temp_scale=self.temp_scale)] * self.n_layer
        return tuple(specs)

    @property
    def layer_specs(self):
        """The attention of every layer, (n_layer,) AttnSpecs."""
        return self._specs

    @property
    def spec(self):
        """The one spec of a uniform stack (every layer the same); a hybrid stack's are in layer_specs."""
        if len(set(self._specs)) > 1:
            raise ValueError(f"this model gives its layers different attentions ({self.layers}); read layer_specs")
        return self._specs[0]

    def describe(self):
        """The attention of the model in words, for labels: 'lssar pos=none', or 'layers=' and its pattern."""
        init = [f"gate_bias={self.gate_bias:g}"] * (self.gate_bias != 0)  # (an init, but not the same run)
        if self.layers:
            return " ".join([f"layers={self.layers}", *init])
        words = layer_text(self._specs[0]).split(":")
        if self.pos == "learned":  # (its layers have no position code of their own)
            words = [w for w in words if w != "pos=none"] + ["pos=learned"]
        return " ".join(words + init)

    def with_overrides(self, **overrides):
        """This config with evaluation-time (or fine-tuning) settings changed: a new, validated GPTConfig.
        length_temp=X gives every global layer the rule X (a layers pattern's own temp= included); reweight_p
        changes a uniform stack's power only (a pattern names each layer's)."""
        ov = dict(overrides)
        if "logn_scale" in ov:  # the older spelling: true = length_temp logn, false = none
            ov["length_temp"] = "logn" if ov.pop("logn_scale") else "none"
        cfg = self
        if "length_temp" in ov:
            rule = ov.pop("length_temp")
            if self.layers:  # drop the pattern's own rules: the new one is every global layer's
                cfg = replace(cfg, layers=",".join(":".join(p for p in g.split(":") if not p.startswith("temp="))
                                                   for g in self.layers.split(",")), length_temp=rule)
            else:
                cfg = replace(cfg, length_temp=rule)
        if self.layers and "reweight_p" in ov:
            raise ValueError(f"reweight_p={ov['reweight_p']:g} changes a uniform stack's re-weighting; this model gives "
                             f"each layer its own (layers={self.layers}): evaluate it as trained")
        return replace(cfg, **ov) if ov else cfg

    def rope(self, length):
        """(inv_freq, attention temperature) of RoPE for a forward over `length` positions (rope_scaling)."""
        d = self.n_embd // self.n_head
        factor = 1.0 if self.rope_scaling == "none" else (self.rope_factor or max(1.0, length / self.block_size))
        temp = yarn_temperature(factor) if self.rope_scaling == "yarn" else 1.0
        return rope_inv_freq(d, self.rope_base, self.rope_scaling, factor, self.block_size), temp


# -----------------------------------------------------------------------------
# 0b. a spec per layer: the `layers` pattern
#
#     layers = "3*softmax:window=16,softmax:pos=none:temp=logn"
#
# Groups separated by commas, each an attention name of the registry (softmax, lssa, lssar, ...) with optional
# `key=value` settings after colons and an optional repeat count `N*` before it; the whole pattern repeats to
# n_layer (which it must divide). A setting not given takes the model-level key of the same name (pos, gate,
# window, and temp from length_temp); reweight_p defaults to the name's (15 for lssar, else 0).
LAYER_KEYS = ("reweight_p", "pos", "gate", "window", "temp")
LENGTH_TEMPS = ("none", "logn", "irope")
LAYER_POS = ("rope", "none", "alibi")


def layer_spec(attn, reweight_p, *, pos, gate, window, temp, block_size, temp_floor, temp_scale):
    """The AttnSpec of one layer from its settings (pos rope | none | alibi, gate none | forget, window >= 0, temp
    none | logn | irope, which only a global layer (window 0) takes)."""
    if pos not in LAYER_POS:
        raise ValueError(f"unknown pos={pos!r} for a layer; choose {', '.join(LAYER_POS)}")
    if gate not in ("none", "forget"):
        raise ValueError(f"unknown gate={gate!r}; choose none or forget")
    if temp not in LENGTH_TEMPS:
        raise ValueError(f"unknown temp={temp!r}; choose one of {', '.join(LENGTH_TEMPS)}")
    return AttnSpec(*canonical_attn(attn, reweight_p), alibi=pos == "alibi", rope=pos == "rope", gate=gate == "forget",
                    window=window, logn_len=block_size if temp == "logn" else 0,
                    irope_floor=temp_floor if temp == "irope" else 0, irope_scale=temp_scale)


def parse_layers(pattern, n_layer, default, block_size, temp_floor, temp_scale):
    """A layers pattern -> n_layer AttnSpecs; errors are one line naming the fix."""
    example = "e.g. layers=\"3*softmax:window=16,softmax:pos=none:temp=logn\""
    unit = []
    for group in (g.strip() for g in str(pattern).split(",")):
        count, star, body = group.rpartition("*") if "*" in group else ("1", "", group)
        if not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"layers: {group!r}: a repeat count is a whole number >= 1 before '*' ({example})")
        name, *pairs = body.strip().split(":")
        if name not in attn_names():
            raise ValueError(f"layers: unknown attention {name!r} in {group!r}; choose from {', '.join(attn_names())}")
        kv, given = dict(default, reweight_p=0.0), set()
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or key not in LAYER_KEYS or not value:
                raise ValueError(f"layers: {group!r}: settings are key=value with keys {', '.join(LAYER_KEYS)} ({example})")
            if key in ("window", "reweight_p"):
                try:
                    value = int(value) if key == "window" else float(value)
                except ValueError:
                    raise ValueError(f"layers: {group!r}: {key}={value!r} is not a "
                                     f"{'whole number' if key == 'window' else 'number'}") from None
            kv[key] = value
            given.add(key)
        if kv["window"] and "temp" not in given:
            kv["temp"] = "none"  # the model-level length_temp is the global layers' rule, not a windowed layer's
        try:
            spec = layer_spec(name, kv.pop("reweight_p"), **kv, block_size=block_size, temp_floor=temp_floor,
                              temp_scale=temp_scale)
        except ValueError as e:
            raise ValueError(f"layers: {group!r}: {e}") from None
        unit += [spec] * int(count)
    if not unit or n_layer % len(unit):
        raise ValueError(f"layers={pattern!r} describes {len(unit)} layer(s), which does not divide n_layer={n_layer}; "
                         f"repeat counts should add up to a divisor of n_layer ({example})")
    specs = unit * (n_layer // len(unit))
    if default["temp"] != "none" and all(sp.window for sp in specs):
        raise ValueError(f"length_temp={default['temp']!r} is the rule of the global layers (window 0); every layer of "
                         f"layers={pattern!r} has a window")
    return specs


def layer_text(spec):
    """One layer's canonical text: its attention name (the shorthand when it is one: lssar), then its settings
    that differ from the defaults (reweight_p of the name, pos=rope, gate=none, window=0, temp=none)."""
    name = next((a for a, (base, p) in ATTN_ALIASES.items() if (base, p) == (spec.kind, spec.reweight_p)), spec.kind)
    default_p = ATTN_ALIASES[name][1] if name in ATTN_ALIASES else 0.0
    parts = [name] + [f"reweight_p={spec.reweight_p:g}"] * (spec.reweight_p != default_p)
    parts += ["pos=alibi" if spec.alibi else "pos=none"] * (not spec.rope)
    parts += ["gate=forget"] * spec.gate + [f"window={spec.window}"] * (spec.window > 0)
    parts += ["temp=logn"] * (spec.logn_len > 0) + ["temp=irope"] * (spec.irope_floor > 0)
    return ":".join(parts)


def layers_text(specs):
    """The canonical pattern of a stack: the shortest unit that repeats to it, with runs as N*layer."""
    texts = [layer_text(sp) for sp in specs]
    n = len(texts)
    period = next(p for p in range(1, n + 1) if n % p == 0 and texts == texts[:p] * (n // p))
    groups = []
    for t in texts[:period]:
        if groups and groups[-1][1] == t:
            groups[-1][0] += 1
        else:
            groups.append([1, t])
    return ",".join(t if c == 1 else f"{c}*{t}" for c, t in groups)


# -----------------------------------------------------------------------------
# 1. attention variants: the formulas, one registry entry each
#
# For query row i (absolute position i, N_i = i + 1 visible keys) and key j <= i of head h, a variant defines
#     s_ij = scale(N_i) * q_i . k_j + bias(i, j, h)      (q, k l2-normalised first when qk_norm)
#     w_ij = f(s_ij, N_i)                                 (given as log f: `logw`; None means f = exp)
# and whether rows are l1-normalised (A_ij = w_ij / sum_j w_ij). Learnable per-head parameters enter through
# `scale` (applied to q in PyTorch before any backend, so autograd trains them); `bias` is fixed.


def _ln(x):
    return torch.log(x) if torch.is_tensor(x) else math.log(x)


def inv_sqrt_d(n, d, params):
    """1 / sqrt(d): the standard scale."""
    return 1.0 / math.sqrt(d)


def log_d_log_n(n, d, params):
    """log(d) * log(N_i): replaces 1 / sqrt(d) and keeps a row's entropy from growing with its length."""
    return math.log(d) * _ln(n)


def learned_s_log_n(n, d, params):
    """s_h * log(N_i) / sqrt(d), s_h learnable per head (SSMax as its authors define it). s_h starts at
    1 / log(block_size), where the scale equals softmax's at the training length."""
    return params["ssmax_s"].view(-1, 1, 1) * _ln(n) / math.sqrt(d)


def log_softplus(s):
    # log(softplus(s)) without -inf: softplus(s) underflows for s << 0, where log(softplus(s)) = s + O(e^s).
    # The clamp keeps the unused branch finite so its gradient is not NaN.
    # (threshold 40, not the default 20: softplus(s) = s is off by e^-s, 2e-9 at s = 20, 4e-18 at 40)
    return torch.where(s < -30.0, s, torch.log(F.softplus(s.clamp_min(-30.0), threshold=40.0)))


def _log_relu(s):
    # log(ReLU(s)); -inf (weight exactly 0) for s <= 0, with a finite unused branch for clean gradients
    return torch.where(s > 0, torch.log(s.clamp_min(1e-30)), float("-inf"))


def stickbreak(s, n, attend_current=False):
    """Stick-breaking weights of a whole row (Tan et al. 2024): beta_ij = sigmoid(z_ij) with z_ij the score; the
    keys are taken nearest first, each keeping beta of what the nearer ones left:
        A_ij = beta_ij prod_{j<k<i} (1 - beta_ik)   for j < i,  i.e.  log A_ij = z_ij - sum_{k=j}^{i-1} softplus(z_ik)
    and what no key took, prod_{k<i} (1 - beta_ik) = exp(-sum_{k<i} softplus(z_ik)), goes to the current token
    (A_ii), so every row sums to 1. attend_current: the current token is the stick's first key (k <= i in the
    product, j <= i) and also receives the remainder. s: (..., rows, keys) scores, -inf after each row's position
    (keys start at position 0); n: (rows, 1) N_i, so row i's own key is at index n - 1."""
    keys = torch.arange(s.shape[-1], device=s.device)
    own = keys == (n.long() - 1)  # (rows, keys): the current token's key
    sp = F.softplus(s, threshold=40.0)  # 0 where masked (s = -inf)
    if not attend_current:
        sp = sp.masked_fill(own, 0.0)
    tail = sp.flip(-1).cumsum(-1).flip(-1)  # sum_{k >= j} softplus(z_ik): only k < i (or <= i) are non-zero
    took = torch.where(own & (not attend_current), float("-inf"), s - tail).exp()  # A_ij; 0 where masked
    left = (-tail[..., :1]).exp()  # the remainder: exp(-sum_{k < i} softplus(z_ik)) (or k <= i)
    return took + own * left


@dataclass(frozen=True)
class Variant:
    equation: str              # the weight of key j in row i, as written in docs/attention.md
    qk_norm: bool              # l2-normalise q and k per head (q.k becomes a cosine)
    scale: Callable            # scale(N, d, params) -> multiplier of q.k for rows with N visible keys
    logw: Callable | None      # logw(s, N) -> log of the unnormalised weight; None = identity (softmax-type)
    normalise: bool            # l1-normalise each row (sum_j weights = 1)
    weight: Callable | None = None  # the same weight computed directly, = exp(logw) (a faster path)
    bias: Callable | None = None    # bias(i, j, h, H) -> fixed additive score term (positions, head)
    params: dict = field(default_factory=dict)  # name -> init(n_head, block_size): learnable per-head tensors
    demo: bool | str = True    # part of the CPU demo sweep, or the reason it is not
    row: Callable | None = None  # row(s, N) -> the weights of whole rows from their scores (-inf where masked), for
                                 # a weight that depends on the other keys of the row (stick-breaking); normalise False


VARIANTS = {
    "softmax": Variant("exp(q.k / sqrt(d)), l1-normalised", False, inv_sqrt_d, None, True),
    "lssa": Variant("softplus(log(d) log(N_i) cos(q, k)), l1-normalised", True, log_d_log_n,
                    lambda s, n: log_softplus(s), True, lambda s, n: F.softplus(s, threshold=40.0)),
    "ssmax": Variant("exp(log(d) log(N_i) cos(q, k)), l1-normalised", True, log_d_log_n, None, True),
    "sigmoid": Variant("sigmoid(q.k / sqrt(d) - log(N_i))", False, inv_sqrt_d,
                       lambda s, n: F.logsigmoid(s - torch.log(n)), False, lambda s, n: torch.sigmoid(s - torch.log(n))),
    "relu": Variant("ReLU(q.k / sqrt(d)) / N_i", False, inv_sqrt_d, lambda s, n: _log_relu(s) - torch.log(n), False,
                    lambda s, n: torch.relu(s) / n),
    # ablations: sigmoid made a distribution (so the re-weighting applies), SSMax in its authors' form
    "sigmoid_l1": Variant("sigmoid(q.k / sqrt(d) - log(N_i)), l1-normalised", False, inv_sqrt_d,
                          lambda s, n: F.logsigmoid(s - torch.log(n)), True, lambda s, n: torch.sigmoid(s - torch.log(n)),
                          demo="an ablation: in the full grid (README), not the quick-start sweep"),
    "ssmax_learn": Variant("exp(s_h log(N_i) q.k / sqrt(d)), s_h learnable per head, l1-normalised", False,
                           learned_s_log_n, None, True, params={"ssmax_s": lambda n_head, block_size: torch.full(
                               (n_head,), 1.0 / math.log(block_size))},
                           demo="a baseline: in the full grid (README), not the quick-start sweep"),
    # stick-breaking: trained without a position code (pos='none'), its stick decays with distance by itself
    "stickbreak": Variant("sigmoid(z_ij) prod_{j<k<i} (1 - sigmoid(z_ik)), z = q.k / sqrt(d); the rest to j = i",
                          False, inv_sqrt_d, None, False, row=lambda s, n: stickbreak(s, n),
                          demo="an alternative trained with pos=none: in the full grid (README)"),
    "stickbreak_self": Variant("sigmoid(z_ij) prod_{j<k<=i} (1 - sigmoid(z_ik)), j <= i; the rest to j = i", False,
                               inv_sqrt_d, None, False, row=lambda s, n: stickbreak(s, n, attend_current=True),
                               demo="stick-breaking's other convention: the current token in the stick"),
}
ATTN_ALIASES = {"lssar": ("lssa", 15.0)}  # shorthand -> (variant, reweight_p it implies)


def alibi_slopes(h, H):
    """ALiBi's slope of head h of H (Press et al. 2022): 2^(-8 (h+1) / H) for H a power of two; otherwise the
    slopes of the largest power of two P < H, then every other slope of 2P (2^(-4 (2 (h - P) + 1) / P)).
    h: an integer tensor of head indices (elementwise: usable inside flex's score_mod)."""
    P = 2 ** int(math.floor(math.log2(H)))
    h = h.to(torch.float64 if h.is_floating_point() and h.dtype == torch.float64 else torch.float32)
    return torch.where(h < P, 2.0 ** (-8.0 * (h + 1) / P), 2.0 ** (-4.0 * (2 * (h - P) + 1) / P))


def alibi_bias(i, j, h, H):
    """-m_h (i - j): a linear penalty on the distance to the key, its slope m_h fixed per head (pos='alibi')."""
    return -alibi_slopes(h, H) * (i - j)


def attn_names():
    """Every name `attn` accepts: each variant followed by its shorthands (lssa, lssar, ...)."""
    return [a for v in VARIANTS for a in (v, *(s for s, (base, _) in ATTN_ALIASES.items() if base == v))]


def demo_runs():
    """The CPU demo sweep's runs: every variant and shorthand, except variants that opt out (demo = reason)."""
    return [a for a in attn_names() if VARIANTS[ATTN_ALIASES.get(a, (a,))[0]].demo is True]


def canonical_attn(attn, reweight_p=0.0):
    """(attn, reweight_p) as written in a config, on a command line or in a checkpoint -> (variant, p): the one
    place shorthands are resolved. 'lssar' is 'lssa' with p = 15 unless p says otherwise (checkpoints made
    before the canonical form stored ('lssar', 0.0)). Errors name the fix."""
    if attn in ATTN_ALIASES:
        attn, default_p = ATTN_ALIASES[attn]
        reweight_p = reweight_p or default_p
    if attn not in VARIANTS:
        raise ValueError(f"unknown attn={attn!r}; choose one of {', '.join(attn_names())}")
    if isinstance(reweight_p, bool) or not isinstance(reweight_p, (int, float)) or not reweight_p >= 0:
        raise ValueError(f"reweight_p must be >= 0 (a number; 0 turns re-weighting off), got {reweight_p!r}")
    if reweight_p > 0 and not VARIANTS[attn].normalise:
        normalised = ", ".join(k for k, v in VARIANTS.items() if v.normalise)
        raise ValueError(f"reweight_p > 0 needs l1-normalised weights ({normalised}); {attn} is unnormalised")
    return attn, float(reweight_p)


@dataclass(frozen=True)
class AttnSpec:
    """What one layer's attention is, resolved once (GPTConfig builds one per layer): every backend receives only
    this, and never learns which layer it serves. The score of query row i is
        s_ij = temperature * L(i) * scale(N_i) * q_i . k_j + bias(i, j, h) + c_i - c_j
    over the keys i - window < j <= i (all j <= i without a window), where N_i = min(i + 1, window) is the number
    of keys row i sees (the N of every length-aware rule: LSSA's log N, SSMax, the re-weighting), L(i) the length
    temperature of a global layer (1 unless set: log-length scaling max(1, log N_i / log logn_len), or iRoPE's
    log(floor((i + 1) / irope_floor) + 1) * irope_scale + 1), `temperature` YaRN's evaluation-time factor, and
    c_i - c_j the forget gate's term (gate): c the cumulative sum of a layer's log forget gates, a tensor that comes
    with the call (the gate's only data-dependent input). `rope` says whether the model rotates this layer's q and
    k before the call (backends ignore it: they see rotated or plain vectors alike)."""
    kind: str                  # a key of VARIANTS
    reweight_p: float = 0.0    # stage 2's power; 0 = off
    alibi: bool = False        # add ALiBi's bias -m_h (i - j) (pos='alibi')
    logn_len: int = 0          # > 1: scale scores by max(1, log(N_i) / log(logn_len)) (logn_len = training length)
    temperature: float = 1.0   # every score x this (YaRN's attention temperature at evaluation)
    gate: bool = False         # add c_i - c_j (gate='forget': the Forgetting Transformer's forget gate)
    window: int = 0            # > 0: query i sees only the keys i - window < j <= i (sliding-window attention)
    irope_floor: int = 0       # > 0: iRoPE's length temperature with this floor_scale (and irope_scale)
    irope_scale: float = 0.1   # iRoPE's attn_scale
    rope: bool = False         # the model applies RoPE to this layer's q and k (pos='rope')

    def __post_init__(self):
        if (self.kind, self.reweight_p) != canonical_attn(self.kind, self.reweight_p):
            raise ValueError(f"AttnSpec needs a canonical (variant, p), got ({self.kind!r}, {self.reweight_p!r})")
        if self.alibi and VARIANTS[self.kind].bias is not None:
            raise ValueError(f"pos='alibi' adds a score bias; variant {self.kind!r} has its own")
        if self.alibi and self.rope:
            raise ValueError("a layer has one position code: pos='alibi' or pos='rope', not both")
        if self.gate and VARIANTS[self.kind].row is not None:
            raise ValueError(f"gate='forget' adds c_i - c_j to a score that one weight depends on; {self.kind} weighs a "
                             "key by the scores of all nearer keys (its stick already decays with distance): use "
                             "gate='none' with it, or a score-based attention (softmax, lssa, ssmax, sigmoid_l1, ...)")
        if self.logn_len == 1 or self.logn_len < 0 or not self.temperature > 0:
            raise ValueError(f"logn_len must be 0 (off) or >= 2 and temperature > 0, got {self.logn_len}, {self.temperature}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be a whole number >= 0 (0 = every earlier key), got {self.window!r}")
        if self.window and VARIANTS[self.kind].row is not None:
            raise ValueError(f"window={self.window} cuts a row short; {self.kind} weighs every key by the nearer ones (its "
                             "stick already ends where it is used up): use window=0 with it, or a score-based attention")
        if self.irope_floor < 0 or not self.irope_scale > 0:
            raise ValueError(f"irope_floor must be >= 0 (0 = off) and irope_scale > 0, got {self.irope_floor}, "
                             f"{self.irope_scale}")
        if self.window and (self.logn_len or self.irope_floor):
            raise ValueError(f"a length temperature (temp=logn or irope) is a global layer's rule; this layer has "
                             f"window={self.window}: drop the temperature or the window")
        if self.logn_len and self.irope_floor:
            raise ValueError("one length temperature per layer: logn or irope, not both")

    @property
    def variant(self):
        """The registry entry, with ALiBi's bias when alibi is set."""
        var = VARIANTS[self.kind]
        return _with_alibi(self.kind, var) if self.alibi else var

    def row_scale(self, n, d, params):
        """The multiplier of q_i . k_j for rows with N visible keys (n: a tensor (rows, 1), or a float). The length
        temperatures read the row's position as N - 1: they are refused under a window, where N stops growing."""
        scale = self.variant.scale(n, d, params)
        if self.logn_len:
            ratio = _ln(n) / math.log(self.logn_len)
            scale = scale * (ratio.clamp_min(1.0) if torch.is_tensor(ratio) else max(1.0, ratio))
        if self.irope_floor:
            scale = scale * irope_temperature(n, self.irope_floor, self.irope_scale)
        return scale * self.temperature if self.temperature != 1.0 else scale

    def key(self):
        """The spec as a string (custom ops take strings, not objects; an f-string, which torch.compile traces);
        from_key inverts it."""
        return (f"{self.kind}|{self.reweight_p!r}|{int(self.alibi)}|{self.logn_len}|{self.temperature!r}|{int(self.gate)}"
                f"|{self.window}|{self.irope_floor}|{self.irope_scale!r}|{int(self.rope)}")

    @staticmethod
    def from_key(key):
        kind, p, alibi, logn_len, temperature, gate, window, floor, iscale, rope = key.split("|")
        return AttnSpec(kind, float(p), alibi == "1", int(logn_len), float(temperature), gate == "1", int(window),
                        int(floor), float(iscale), rope == "1")

    @staticmethod
    def of(attn, reweight_p=0.0, **kw):
        return AttnSpec(*canonical_attn(attn, reweight_p), **kw)

    # What a backend computes with (kernels/ never imports this file: it calls these on the spec it is handed).
    exempt_rows = property(lambda self: REWEIGHT_EXEMPT_ROWS, doc="rows at positions below this get O_i = 0")

    def row_n(self, pos_offset, Tq, like):
        """N_i of query rows pos_offset .. pos_offset + Tq - 1: the keys each sees, (Tq, 1) (see `row_n`)."""
        return row_n(pos_offset, Tq, like, self.window)

    def first_key(self, pos):
        """The first key a query at absolute position pos sees (an int): 0, or pos - window + 1 under a window."""
        return max(0, pos - self.window + 1) if self.window else 0

    def alibi_slopes(self, H, device=None):
        """ALiBi's per-head slopes m_h (H,) fp32 when the spec has ALiBi, else None (for kernels that add the bias
        themselves)."""
        return alibi_slopes(torch.arange(H, device=device), H).float() if self.alibi else None

    def stage1(self, s, n, direct):
        """Stage-1 weights of scaled scores s (see `stage1`)."""
        return stage1(s, self.variant, n, direct)

    def reweight(self, phi, S, n, pos, inplace=False):
        """Stage 2 of weights phi of the query rows at absolute positions pos (see `reweight`)."""
        return reweight(phi, S, n, reweight_offset(pos, n.dtype).view(-1, 1), self.reweight_p, inplace)

    def reweight_grad(self, g, phi, S, Z, aux):
        return reweight_grad(g, phi, S, Z, aux, self.reweight_p)

    def reweight_arg(self, A, n, pos):
        """x = N A - O of the rows at positions pos (elementwise: usable inside flex's score_mod)."""
        return reweight_arg(A, n, reweight_offset(pos, A.dtype))


def irope_temperature(n, floor, scale):
    """iRoPE's length temperature of the query at position i = n - 1 (Llama 4's global NoPE layers):
        log(floor((i + 1) / floor_scale) + 1) * attn_scale + 1
    1 up to position floor_scale - 2, growing with the log of the length in units of floor_scale after."""
    if torch.is_tensor(n):
        return torch.log(torch.floor(n / floor) + 1.0) * scale + 1.0
    return math.log(math.floor(n / floor) + 1.0) * scale + 1.0


kernels.use_spec(AttnSpec)  # custom ops pass specs as key strings; kernels rebuild them with this class

_ALIBI = {}


def _with_alibi(kind, var):
    if kind not in _ALIBI:  # one composed entry per variant, made once (no dataclass work in a hot path)
        _ALIBI[kind] = replace(var, bias=alibi_bias, equation=var.equation + ", score - m_h (i - j) (ALiBi)")
    return _ALIBI[kind]


# -----------------------------------------------------------------------------
# 2. the re-weighting (stage 2), written once: the reference, the math backend's forward and backward, and flex's
# second pass call these; the Triton kernels compute the same two equations per tile.

REWEIGHT_EXEMPT_ROWS = 3  # rows i = 0, 1, 2 use offset O_i = 0 "to avoid early instability"


def reweight_offset(pos, dtype):
    """O_i for absolute query positions pos: 0 for the first REWEIGHT_EXEMPT_ROWS rows, 1 after."""
    return (pos >= REWEIGHT_EXEMPT_ROWS).to(dtype)


def reweight_arg(A, n, O, out=None):
    """x_ij = N_i A_ij - O_i: positive exactly for the weights above the row's uniform weight 1 / N_i (O = 1)."""
    return torch.addcmul(-O, A, n, out=out)


def _powi(u, e, inplace=False):
    """u ** e; for a whole e up to 64 by repeated squaring (~3x faster than pow's exp(e log u) on CPU).
    inplace=True may overwrite u; inplace=False is out of place throughout (safe under autograd)."""
    if e != int(e) or not 1 <= e <= 64:
        return u.pow_(e) if inplace else u.pow(e)
    e, out, sq = int(e), None, u
    while True:
        if e & 1:
            out = (sq.clone() if inplace else sq) if out is None else (out.mul_(sq) if inplace else out * sq)
        e >>= 1
        if not e:
            return out
        sq = sq.mul_(sq) if inplace else sq * sq


def reweight(phi, S, n, O, p, inplace=False):
    """Stage 2 from stage-1 weights phi (..., rows, keys) with row sums S (..., rows, 1), N_i = n, offsets O:
        R_ij = ReLU(x_ij) ** p,  x_ij = N_i phi_ij / S_i - O_i,  final weights R_ij / sum_j R_ij.
    Computed as u_ij = ReLU(x_ij) / max_j x_ij and R' = u ** p: the same ratio R' / sum R' without overflow
    (x reaches N_i, and x ** 15 overflows fp32 past ~370). Returns (R', Z = sum_j R', aux): a row with no
    x > 0 (an exactly uniform row with O = 1) gets R' = 0, Z = 0 and a zero output. inplace=True overwrites phi
    (forward only, aux None); otherwise aux = (a, u^(p-1)) for reweight_grad, a = N_i / (S_i max_j x_ij).
    Differentiable by autograd when phi requires grad (the reference backend); in-place inside otherwise."""
    r = n / S
    xm = reweight_arg(phi.amax(dim=-1, keepdim=True), r, O)  # max_j x_ij: x is increasing in phi_ij
    inv = torch.where(xm > 0, 1.0 / xm.clamp_min(torch.finfo(xm.dtype).tiny), 0.0)
    a = r * inv
    if inplace:  # u = x / max x, written over phi
        u = reweight_arg(phi, a, O * inv, out=phi).clamp_min_(0.0)
        R = _powi(u, p, inplace=True)
        return R, R.sum(dim=-1, keepdim=True), None
    tracked = torch.is_grad_enabled() and phi.requires_grad
    u = reweight_arg(phi, a, O * inv)
    u = u.clamp_min(0.0) if tracked else u.clamp_min_(0.0)
    if p > 1:
        du = _powi(u, p - 1) if tracked else _powi(u.clone(), p - 1, inplace=True)
    else:  # u^(p-1) with 0 where u = 0 (ReLU passes no gradient there)
        du = torch.where(u > 0, u.pow(p - 1), 0.0)
    R = u * du if tracked else u.mul_(du)
    return R, R.sum(dim=-1, keepdim=True), (a, du)


def reweight_grad(g, phi, S, Z, aux, p):
    """dL/dphi through stage 2, from g_ij = Z_i dL/dR'_ij (= dout_i . v_j - dout_i . out_i): the derivative of
    R' / Z through u ** p, x = N phi / S - O and S = sum_j phi (max_j x cancels in R' / Z). Overwrites g."""
    a, du = aux
    g.mul_(du)
    m = (phi * g).sum(dim=-1, keepdim=True) / S
    return g.sub_(m).mul_(p * a / Z.clamp_min(torch.finfo(Z.dtype).tiny))


def stage1(s, var, n, direct):
    """Stage-1 weights of scaled scores s (-inf where masked): exact for unnormalised kinds, up to a per-row
    factor for normalised ones (exp(logw - row max): no overflow). direct uses var.weight (see kernels). Row-wise
    variants (var.row) need whole rows: every key a row can see."""
    if var.row is not None:
        return var.row(s, n)
    if direct or (not var.normalise and var.weight is not None):
        return var.weight(s, n)
    logw = s if var.logw is None else var.logw(s, n)
    if not var.normalise:
        return torch.exp(logw)
    m = logw.detach().amax(dim=-1, keepdim=True)
    return torch.exp(logw - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))


# -----------------------------------------------------------------------------
# 3. the attention function


def row_n(pos_offset, Tq, like, window=0):
    """N_i of each query row, (Tq, 1): the keys it sees, absolute position + 1, at most `window` (> 0); fp32 at
    least (fp64 for fp64 inputs)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    n = torch.arange(pos_offset + 1, pos_offset + Tq + 1, device=like.device, dtype=dtype).view(Tq, 1)
    return n.clamp_max(window) if window else n


def prepare(q, k, spec, pos_offset, params=None):
    """QK-norm and the per-row (per-head) scale, in fp32 at least (also under bf16 autocast: the p-th power of
    the re-weighting amplifies score errors ~p-fold, and a bf16 cosine is off by ~4e-3, i.e. ~0.1 in a score
    scaled by log(d) log(N)). Returns q * scale and k, so that every backend's score is plain q . k."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(acc), k.to(acc)
    if spec.variant.qk_norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    scale = spec.row_scale(spec.row_n(pos_offset, q.shape[2], q), q.shape[-1], params or {})
    return q * scale, k  # (the scale is in acc's dtype, or a float)


def causal_attention(q, k, v, spec, pos_offset=None, *, backend="auto", params=None, chunk=256, dots="auto", gate=None):
    """Causal attention of the last Tq positions over Tk keys with the attention `spec` (an AttnSpec).

    q: (B, H, Tq, d), k, v: (B, H, Tk, d), after RoPE. Key j sits at absolute position j; query t at
    pos_offset + t (default Tk - Tq: the queries are the last Tq positions), and sees keys j <= its position;
    N = its position + 1. The same call serves a full forward (Tq = Tk) and KV-cache decoding (Tq < Tk).
    params: the variant's learnable per-head tensors. backend: 'reference' (below) or one of kernels.BACKENDS.
    dots: the precision of the q . k dots (GPTConfig.attn_dots). gate: c (B, H, Tk), the cumulative log forget gates
    at every key position, when spec.gate (the score gains c_i - c_j; queries take c at their positions).
    """
    Tq, Tk = q.shape[2], k.shape[2]
    pos_offset = Tk - Tq if pos_offset is None else int(pos_offset)
    if pos_offset < 0 or pos_offset + Tq > Tk:
        raise ValueError(f"pos_offset={pos_offset} with Tq={Tq} needs 0 <= pos_offset <= Tk - Tq = {Tk - Tq}")
    if spec.gate != (gate is not None) or (gate is not None and gate.shape != k.shape[:3]):
        raise ValueError(f"spec.gate={spec.gate} needs gate = c of shape (B, H, Tk) = {tuple(k.shape[:3])} exactly when set, "
                         f"got {None if gate is None else tuple(gate.shape)}")
    extra = (*(params or {}).values(), *(() if gate is None else (gate,)))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *extra))
    qs, ks = kernels.round_dots(*prepare(q, k, spec, pos_offset, params), dots)
    gate = None if gate is None else gate.float() if gate.dtype != torch.float64 else gate
    if backend == "reference":
        return reference_attention(qs, ks, v, spec, pos_offset, gate)
    return kernels.attend(qs, ks, v, spec, pos_offset, backend=backend, chunk=chunk, needs_grad=needs_grad, dots=dots,
                          gate=gate)


def reference_weights(qs, ks, spec, pos_offset, gate=None):
    """The final weights (B, H, Tq, Tk) of prepared qs, ks: the formulas above, plainly, with a full Tq x Tk matrix."""
    var, (Tq, Tk) = spec.variant, (qs.shape[2], ks.shape[2])
    n = spec.row_n(pos_offset, Tq, qs)
    pos = torch.arange(pos_offset, pos_offset + Tq, device=qs.device).view(Tq, 1)
    keys = torch.arange(Tk, device=qs.device)
    s = qs @ ks.transpose(-2, -1)
    if var.bias is not None:
        s = s + var.bias(pos, keys, torch.arange(qs.shape[1], device=qs.device).view(-1, 1, 1), qs.shape[1])
    if gate is not None:
        s = s + (gate[..., pos_offset:pos_offset + Tq, None] - gate[..., None, :]).to(s.dtype)
    hidden = (keys > pos) | (keys <= pos - spec.window) if spec.window else keys > pos
    s = s.masked_fill(hidden, float("-inf"))
    w = stage1(s, var, n, direct=False)
    if not var.normalise:
        return w
    S = w.sum(dim=-1, keepdim=True)
    if spec.reweight_p == 0:
        return w / S
    R, Z, _ = reweight(w, S, n, reweight_offset(pos, n.dtype), spec.reweight_p)
    return torch.where(Z > 0, R / Z.clamp_min(torch.finfo(Z.dtype).tiny), 0.0)


def reference_attention(qs, ks, v, spec, pos_offset, gate=None):
    with torch.autocast(qs.device.type, enabled=False):
        return (reference_weights(qs, ks, spec, pos_offset, gate) @ v.to(qs.dtype)).to(v.dtype)


@torch.no_grad()
def attention_weights(q, k, spec, pos_offset=None, *, params=None, chunk=256, gate=None):
    """The weights causal_attention uses (after both stages), chunk by chunk, for diagnostics: yields
    (absolute position of the chunk's first query row, w) with w (B, H, rows, keys seen by the chunk);
    never a full T x T matrix."""
    pos_offset = k.shape[2] - q.shape[2] if pos_offset is None else int(pos_offset)
    with torch.autocast(q.device.type, enabled=False):
        qs, ks = prepare(q, k, spec, pos_offset, params)
        yield from kernels.weights(qs, ks, spec, pos_offset, chunk=chunk, gate=None if gate is None else gate.float())


# -----------------------------------------------------------------------------
# 4. the model


ROPE_SCALINGS = ("none", "pi", "ntk", "yarn")
YARN_ALPHA, YARN_BETA = 1.0, 32.0  # YaRN's ramp: frequencies that turn < 1 time within the training length are
                                   # interpolated, > 32 times kept (the paper's values for LLaMA)


def rope_inv_freq(d, base, scaling="none", factor=1.0, train_len=0):
    """RoPE's rotation frequencies theta_i = base^(-2i/d), i < d/2, or (factor s > 1) their evaluation-time
    extension to s x the training length train_len:
      pi    theta_i / s: positions interpolated into the trained range (position interpolation, Chen et al. 2023)
      ntk   base -> base * s^(d / (d - 2)): "NTK-aware" scaling; the fastest frequency is kept, the slowest
            interpolated by s (bloc97 2023)
      yarn  (1 - g_i) theta_i / s + g_i theta_i with g_i = clamp((r_i - 1) / (32 - 1), 0, 1) and r_i =
            train_len theta_i / (2 pi), the turns of frequency i within the training length: fast frequencies
            kept, slow ones interpolated (Peng et al. 2023); used with yarn_temperature(s)."""
    if scaling == "ntk" and factor > 1:
        base = base * factor ** (d / (d - 2))
    theta = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if factor <= 1 or scaling in ("none", "ntk"):
        return theta
    if scaling == "pi":
        return theta / factor
    g = ((train_len * theta / (2 * math.pi) - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
    return (1 - g) * theta / factor + g * theta


def yarn_temperature(factor):
    """YaRN's attention temperature: logits x (0.1 ln(s) + 1)^2 for factor s > 1 (it scales q and k each by 0.1 ln(s) + 1)."""
    return (0.1 * math.log(factor) + 1.0) ** 2 if factor > 1 else 1.0


def rope_cos_sin(T, d, base, device, offset=0, inv_freq=None):
    """cos, sin (T, d/2) of the rotation angles of positions offset .. offset+T-1 (inv_freq: rope_inv_freq's)."""
    inv_freq = (rope_inv_freq(d, base) if inv_freq is None else inv_freq).to(device)
    t = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, d/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x, cos, sin):
    # rotate pairs (x1_i, x2_i) of the two halves of each head by position-dependent angles
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


@dataclass
class AttentionProbe:
    """Hands attention weights to fn(layer, first_position, w) during a forward pass (diagnose.py uses it):
    w (B, H, rows, keys) are the weights of the query rows from first_position on, chunk by chunk, for the
    layers in `layers` (None: all) and the last `last_rows` query rows of each call (None: all)."""
    fn: Callable
    layers: tuple | None = None
    last_rows: int | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.config, self.layer = config, layer
        spec = config.layer_specs[layer]
        # the variant's learnable per-head parameters (none for most kinds)
        self.attn_params = nn.ParameterDict({name: nn.Parameter(init(config.n_head, config.block_size))
                                             for name, init in spec.variant.params.items()})
        if spec.gate:  # one forget gate per head from the block's normalised input (init N(0, 0.02), gate_bias)
            self.fgate = nn.Linear(config.n_embd, config.n_head, bias=True)

    def forget_gate(self, x, cache):
        """c (B, H, cached + T): the cumulative sum over positions of log f_t = logsigmoid(w_h . x_t + b_h), in fp32
        (fp64 in a float64 model), continued from the cache's last position; c_i - c_j = sum_{l=j+1}^{i} log f_l (0
        on the diagonal)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        c = torch.cumsum(F.logsigmoid(self.fgate(x).to(acc)).transpose(1, 2), dim=-1)  # (B, H, T)
        if cache is not None and "c" in cache:
            c = torch.cat([cache["c"], c + cache["c"][..., -1:]], dim=-1)
        return c

    def forward(self, x, spec, rope=None, cache=None, probe=None):
        """x (B, T, C) -> (B, T, C) with this layer's attention `spec` (rope: cos, sin of the positions when the
        layer rotates q and k). cache: this layer's dict of past k, v (after RoPE) and c; a windowed layer keeps
        only what its next queries can see (cache_keep), and its queries are placed by their position among
        the kept keys, which gives every row the same keys, N_i and exempt rows as in a full pass."""
        B, T, C = x.shape
        cfg = self.config
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        c = self.forget_gate(x, cache) if spec.gate else None
        if cache is not None:  # cache: dict holding this layer's past k, v (after RoPE) and c
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            keep = cache_keep(spec, k.shape[2])
            cache["k"], cache["v"] = k[:, :, -keep:], v[:, :, -keep:]
            if c is not None:
                cache["c"] = c[..., -keep:]
        params = {name: p for name, p in self.attn_params.items()}  # (dict(ParameterDict) breaks torch.compile's graph)
        if probe is not None and (probe.layers is None or self.layer in probe.layers):
            m = T if probe.last_rows is None else min(probe.last_rows, T)
            for first, w in attention_weights(q[:, :, T - m:], k, spec, params=params, chunk=cfg.attn_chunk, gate=c):
                probe.fn(self.layer, first, w)
        y = causal_attention(q, k, v, spec, backend=cfg.attn_backend, params=params, chunk=cfg.attn_chunk,
                             dots=cfg.attn_dots, gate=c)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def cache_keep(spec, n):
    """How many of a layer's n cached keys its later queries need: all of them, or under a window its last
    window - 1 (never fewer than the re-weighting's exempt rows, so that a kept row's position among the kept
    keys is an exempt row exactly when its absolute position is): decoding memory O(window), not O(T)."""
    return n if not spec.window else min(n, max(spec.window - 1, spec.exempt_rows))


def cache_bytes(cache):
    """Bytes a KV cache holds (keys, values and forget-gate sums of every layer): what decoding keeps in memory."""
    return sum(t.numel() * t.element_size() for layer in cache or () for t in layer.values() if torch.is_tensor(t))


def cache_len(cache):
    """Tokens a KV cache has seen (0 for none): its keys may be fewer (a windowed layer keeps its last ones)."""
    return cache[0].get("seen", 0) if cache else 0


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, spec, rope=None, cache=None, probe=None):
        x = x + self.attn(self.ln_1(x), spec, rope, cache, probe)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # False: every layer computes without its re-weighting (p = 0), a curriculum's first stage (train.py's
        # reweight_start: a model with p = 15 from the first step gets almost no gradient toward keys it does not
        # already weigh above average, docs/results.md); the layers' specs stay as configured
        self.reweight_on = True
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
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
            elif pn.endswith("fgate.bias"):  # (after _init_weights zeroed it; no random draw: 0 = the same init)
                torch.nn.init.constant_(p, config.gate_bias)

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

    def forward(self, idx, targets=None, cache=None, reduction="mean", probe=None, rope_len=None):
        """idx (B, T) -> logits (B, T, V) and, with targets, the cross-entropy loss.
        cache: list of per-layer dicts from new_cache(); idx then holds the tokens after the cached ones.
        probe: an AttentionProbe that receives attention weights during the pass (diagnostics).
        rope_len: the length that sets a per-length rope_factor (default: cached + new tokens; generate() passes
        the final length, so that every decoding step rotates with the same frequencies)."""
        B, T = idx.shape
        offset = cache_len(cache)
        cfg = self.config
        if cfg.pos == "learned" and offset + T > cfg.block_size:
            raise ValueError(f"learned position embeddings stop at block_size={cfg.block_size}, asked for "
                             f"{offset + T} tokens; use a pos='rope', 'alibi' or 'none' model to go longer")
        x = self.transformer.wte(idx)
        rope, specs = None, cfg.layer_specs
        if not self.reweight_on:
            specs = [replace(sp, reweight_p=0.0) if sp.reweight_p else sp for sp in specs]
        if cfg.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(offset, offset + T, device=idx.device))
        if any(sp.rope for sp in specs):
            inv_freq, temperature = cfg.rope(rope_len or offset + T)
            rope = rope_cos_sin(T, cfg.n_embd // cfg.n_head, cfg.rope_base, idx.device, offset, inv_freq)
            if temperature != 1.0:  # YaRN's temperature belongs to the layers it rotates
                specs = [replace(sp, temperature=temperature) if sp.rope else sp for sp in specs]
        x = self.transformer.drop(x)
        if cache is not None:
            cache[0]["seen"] = offset + T
        for i, block in enumerate(self.transformer.h):
            x = block(x, specs[i], rope if specs[i].rope else None, None if cache is None else cache[i], probe)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            acc = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least (fp64 in a float64 model)
            loss = F.cross_entropy(logits.to(acc).view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction=reduction)
        return logits, loss

    def new_cache(self):
        """Per-layer dicts for KV-cache decoding (forward fills them; cache[0]['seen'] counts the tokens fed)."""
        return [dict() for _ in range(self.config.n_layer)]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]  # matmuls and embeddings decay; biases, norms, per-head scales not
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        extra = dict(fused=True) if device_type == "cuda" else dict()
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, vocab=None):
        """Sample max_new_tokens after idx (B, T) with a KV cache: each step feeds one token and the
        attention sees its absolute position, so the logits equal those of a full forward pass.
        rope/none models keep the whole context (that is the point of length extrapolation); learned-position
        models crop to the last block_size tokens (and rebuild the cache) like nanoGPT. vocab: only ids below it are
        drawn (a BPE model's embedding is padded past its tokenizer's vocabulary, e.g. 50304 for GPT-2's 50257)."""
        cache, bs, final_len = self.new_cache(), self.config.block_size, idx.size(1) + max_new_tokens
        for _ in range(max_new_tokens):
            if self.config.pos == "learned" and idx.size(1) > bs:
                cache, ctx = self.new_cache(), idx[:, -bs:]  # past the learned table: recompute on the last bs
            else:
                ctx = idx[:, cache_len(cache):]  # only the tokens not cached yet
            logits, _ = self(ctx, cache=cache, rope_len=final_len)
            logits = logits[:, -1, :]
            if not torch.isfinite(logits).all():  # (multinomial would fail deep inside, argmax pick garbage)
                raise ValueError(f"the next-token logits are not finite ({logits[~torch.isfinite(logits)][0].item()}) "
                                 f"at position {idx.size(1)}")
            logits = logits / max(temperature, 1e-8)
            if vocab is not None:
                logits[:, vocab:] = -float("inf")
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
