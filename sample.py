"""
Sample from a trained checkpoint (any attention kind; its config is restored from the checkpoint).

    python sample.py --out_dir=out-shakespeare-char-lssar
    python sample.py --out_dir=out-shakespeare-char-lssar --start="ROMEO:" --num_samples=3 --max_new_tokens=300
    python sample.py --out_dir=... --start=FILE:prompt.txt --temperature=0.8 --top_k=200
"""

import torch

from common import (
    autocast_ctx,
    get_tokenizer,
    load_checkpoint,
    load_meta,
    model_from_checkpoint,
    model_vocab_size,
    parse_reweight_p,
    pick_device,
)
from configurator import configure

# -----------------------------------------------------------------------------
out_dir = "out"
start = "\n"             # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8        # 0 = greedy
top_k = 200              # 0 = no top-k filtering
reweight_p = "ckpt"      # ckpt = as the checkpoint was trained; a number overrides its re-weighting power (0 = off)
attn_backend = ""        # override the checkpoint's attention backend (auto | reference | math | sdpa | flex | triton)
seed = 1337
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------
configure(globals())

device = pick_device(device)
ctx, _ = autocast_ctx(device, dtype)
torch.manual_seed(seed)
p = parse_reweight_p(reweight_p)
ckpt = load_checkpoint(out_dir, device)
overrides = {} if p == "ckpt" else {"reweight_p": p}
if attn_backend:
    overrides["attn_backend"] = attn_backend
try:
    model = model_from_checkpoint(ckpt, device, **overrides).eval()
except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
cfg = ckpt["config"]
meta = load_meta(cfg["dataset"], cfg.get("data_dir", ""))
if meta is not None and model_vocab_size(meta) != model.config.vocab_size:
    raise SystemExit(f"vocab mismatch: data/{cfg['dataset']}/meta.pkl has {meta['vocab_size']} tokens but the "
                     f"checkpoint's model has {model.config.vocab_size}; re-run that dataset's prepare.py")
encode, decode = get_tokenizer(meta)
print(f"loaded {out_dir}: attn={model.config.attn} reweight_p={model.config.reweight_p:g} pos={model.config.pos}, "
      f"trained {ckpt['iter_num']} iters, tokenizer {'char' if meta and 'stoi' in meta else 'BPE'}")

if start.startswith("FILE:"):
    with open(start[5:], encoding="utf-8") as f:
        start = f.read()
ids = encode(start)
if not ids:
    raise SystemExit("prompt error: the prompt encodes to no tokens; pass a non-empty --start")
x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
with torch.no_grad(), ctx:
    for _ in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None)
        print(decode(y[0].tolist()))
        print("---------------")
