"""
Sample from a trained checkpoint (any attention kind; its config is restored from the checkpoint).

    python sample.py --out_dir=out-shakespeare-char-lssar
    python sample.py --out_dir=out-shakespeare-char-lssar --start="ROMEO:" --num_samples=3 --max_new_tokens=300
    python sample.py --out_dir=... --start=FILE:prompt.txt --temperature=0.8 --top_k=200
    python sample.py --out_dir=out-shakespeare-char-softmax --rope_scaling=yarn --max_new_tokens=2000

Evaluation-time settings as eval_length.py has them (ckpt = as trained): --reweight_p, --rope_scaling (pi, ntk,
yarn; by --rope_factor, or 0 = by the generation's final length / block_size), --logn_scale.
"""

import torch

from configurator import configure
from dataset import compare_data, data_dir_for, data_fingerprint, get_tokenizer, load_meta, model_vocab_size
from eval_length import eval_settings
from kernels import BACKENDS
from options import autocast_ctx, check_range, one_line, pick_device
from runs import load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
out_dir = "out"
start = "\n"             # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8        # 0 = greedy
top_k = 200              # 0 = no top-k filtering
reweight_p = "ckpt"      # ckpt = as the checkpoint was trained; a number overrides its re-weighting power (0 = off)
rope_scaling = "ckpt"    # ckpt = as trained; none | pi | ntk | yarn: RoPE extended past the training length
rope_factor = 0.0        # its factor; 0 = the generation's final length / block_size
logn_scale = "ckpt"      # ckpt | true (scores x max(1, log N_i / log block_size)) | false
length_temp = "ckpt"     # ckpt | none | logn | irope: the length temperature of every global layer
attn_backend = ""        # override the checkpoint's attention backend (auto | reference | math | sdpa | flex | triton)
seed = 1337
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------
# bounded: the KV cache grows with every token, and a sample of billions would never end (sample longer texts in
# pieces, each continuing the last with --start=FILE:...)
MAX_NEW_TOKENS, MAX_SAMPLES = 100_000, 1_000


def check_options(o):
    """Every option parsed and range-checked before the checkpoint is read (one line naming the fix otherwise):
    returns the eval-time overrides."""
    check_range({"max_new_tokens": o["max_new_tokens"]}, 1, MAX_NEW_TOKENS)
    check_range({"num_samples": o["num_samples"]}, 1, MAX_SAMPLES)
    check_range({"temperature": o["temperature"], "top_k": o["top_k"]}, 0)
    autocast_ctx(pick_device(o["device"]), o["dtype"])
    settings = eval_settings(reweight_p=o["reweight_p"], rope_scaling=o["rope_scaling"], rope_factor=o["rope_factor"],
                             logn_scale=o["logn_scale"], length_temp=o["length_temp"])
    if len(settings) > 1:
        raise SystemExit("config error: sample.py takes one value each of reweight_p, rope_scaling, logn_scale and "
                         "length_temp, not lists")
    if o["attn_backend"] and o["attn_backend"] not in ("reference", *BACKENDS):
        raise SystemExit(f"config error: unknown attn_backend={o['attn_backend']!r}; choose one of "
                         f"{', '.join(('reference', *BACKENDS))} (or leave it out: the checkpoint's)")
    overrides = dict(settings[0])
    if o["attn_backend"]:
        overrides["attn_backend"] = o["attn_backend"]
    return overrides


def main():
    global start, device
    overrides = check_options(configure(globals()))
    device = pick_device(device)
    ctx, _ = autocast_ctx(device, dtype)
    torch.manual_seed(seed)
    if start.startswith("FILE:"):  # read before the checkpoint: a wrong path fails fast
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except (OSError, ValueError) as e:  # missing, a folder, not UTF-8 text
            raise SystemExit(f"prompt error: cannot read the prompt file {start[5:]!r} ({one_line(e)}); pass "
                             "--start=FILE:path of a UTF-8 text file, or the prompt itself") from None
    ckpt = load_checkpoint(out_dir, device)
    model = model_from_checkpoint(ckpt, device, **overrides).eval()  # a bad override is a one-line error there
    cfg = ckpt["config"]
    meta = load_meta(cfg["dataset"], cfg.get("data_dir", ""))
    if meta is not None and model_vocab_size(meta) != model.config.vocab_size:
        raise SystemExit(f"vocab mismatch: data/{cfg['dataset']}/meta.pkl has {meta['vocab_size']} tokens but the "
                         f"checkpoint's model has {model.config.vocab_size}; re-run that dataset's prepare.py")
    # the same size is not enough: ids must mean the characters (or BPE tokens) the model was trained on
    compare_data(ckpt.get("data"), data_fingerprint(meta, data_dir_for(cfg["dataset"], cfg.get("data_dir", ""))), out_dir,
                 "sample error")
    encode, decode = get_tokenizer(meta)
    vocab = meta["vocab_size"] if meta is not None else 50257  # ids the tokenizer decodes (no meta.pkl: GPT-2 shards)
    mc = model.config
    print(f"loaded {out_dir}: attention {mc.describe()}"
          + (f" rope_scaling={mc.rope_scaling} (factor {mc.rope_factor or 'per length'})" if mc.rope_scaling != "none" else "")
          + f", trained {ckpt['iter_num']} iters, tokenizer {'char' if meta and 'stoi' in meta else 'BPE'}")

    ids = encode(start)
    if not ids:
        raise SystemExit("prompt error: the prompt encodes to no tokens; pass a non-empty --start")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    with torch.no_grad(), ctx:
        for _ in range(num_samples):
            try:
                y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, vocab=vocab)
            except ValueError as e:  # a diverged checkpoint, or an eval-time setting that overflows it
                raise SystemExit(f"sample error: {out_dir}: {e}; sample a checkpoint that did not diverge, or drop the "
                                 "eval-time setting") from None
            print(decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    main()
