"""
Train a GPT with a chosen attention normalisation.

    python train.py config/train_shakespeare_char.py                  # the CPU demo (softmax)
    python train.py config/shakespeare_char_lssar.py --max_iters=500  # a variant, with an override
    python train.py config/shakespeare_char_lssar.py --init_from=resume

Every module-level variable below is a config key that a config file or --key=value can set.
"""

import atexit
import csv
import errno
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure
from dataset import (
    PREPARE_HINT,
    check_token_ids,
    compare_data,
    data_dir_for,
    data_fingerprint,
    even_windows,
    get_batch,
    load_meta,
    load_split,
    model_vocab_size,
    n_windows,
    random_windows,
    sequential_windows,
)
from model import GPT, GPTConfig
from options import INVOCATION, RESUME_FREE, autocast_ctx, check_train_options, one_line, parse_reweight_p, pick_device
from retrieval import answer_stats, task_of
from runs import (
    LOCK_FILE,
    checked_config,
    drop_aside,
    load_checkpoint,
    lock_out_dir,
    model_from_checkpoint,
    restore_aside,
    save_checkpoint,
    set_aside,
    tidy_run_dir,
)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 250      # evaluate and checkpoint every this many iterations (and at the end)
log_interval = 10
eval_iters = 20          # batches of the fixed evaluation windows
eval_only = False        # evaluate the checkpoint in out_dir once, write nothing
always_save_checkpoint = True  # ckpt.pt (latest) at every eval; False: only when val loss improves. best.pt: the best
init_from = "scratch"    # scratch | resume (continue out_dir/ckpt.pt with its own settings) | DIR or FILE of another
                         # run to fine-tune
overwrite = False        # scratch into an out_dir that holds a checkpoint: refused unless True (the old run is kept
                         # aside until the new one has saved a checkpoint)
finetune_reweight_p = "ckpt"  # fine-tuning only: ckpt = the init model's re-weighting power, or a number to train
                              # with instead (15 turns an LSSA run into LSSAR, 0 switches re-weighting off)
# wandb (off by default; WANDB_MODE=offline works without a network)
wandb_log = False
wandb_project = "softplus-attention"
wandb_run_name = "run"
# data
dataset = "shakespeare_char"
data_dir = ""            # default: data/<dataset>
gradient_accumulation_steps = 1
batch_size = 12
block_size = 1024
window_align = 1         # windows start at multiples of this (e.g. one fixed-length example per window); 1 = anywhere
data_order = "random"    # random: each step draws its windows from (seed, step); sequential: the windows in the order
                         # stored, for data whose order is a curriculum (data/retrieval_char/prepare.py --curriculum)
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True
attn = "softmax"         # a variant of model.VARIANTS (softmax, lssa, ssmax, sigmoid, relu) or the shorthand lssar
reweight_p = 0.0         # re-weighting power, a number >= 0; 0 = off (attn=lssar means lssa with 15)
reweight_start = 0       # a curriculum: the re-weighting (of every layer that has one) is off for the first this many
                         # steps, then on; 0 = on from the start (docs/results.md: retrieval from scratch needs it)
pos = "rope"             # rope | learned | none | alibi
gate = "none"            # none | forget: a forget gate per layer adds c_i - c_j to the scores (FoX: attn=softmax, pos=none)
gate_bias = 0.0          # the forget gates' initial bias: 0 = f 1/2 (the FoX paper's); 4 = f 0.982 (model.GPTConfig)
window = 0               # > 0: sliding-window attention (query i sees keys i - window < j <= i)
layers = ""              # a spec per layer, e.g. "3*softmax:window=16,softmax:pos=none:temp=logn" (docs/attention.md)
length_temp = "none"     # the global layers' length temperature: none | logn | irope
temp_floor = 0           # irope's floor_scale (0 = block_size)
temp_scale = 0.1         # irope's attn_scale
rope_base = 10000.0
rope_scaling = "none"    # RoPE extension past the training length: none | pi | ntk | yarn (usually set at evaluation)
rope_factor = 0.0        # its factor; 0 = per evaluated length (length / block_size)
logn_scale = False       # scale scores by max(1, log(N_i) / log(block_size)) (usually set at evaluation)
attn_backend = "auto"    # auto | reference | math | sdpa | flex | triton (auto: the fastest exact one, see kernels/)
attn_chunk = 256
attn_dots = "auto"       # precision of the q . k dots: auto | fp32 | bf16 | fp16 (model.GPTConfig.attn_dots)
# AdamW and schedule
learning_rate = 6e-4
max_iters = 5000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0          # 0 disables
decay_lr = True
warmup_iters = 100
lr_decay_iters = 5000
min_lr = 6e-5
# system
device = "auto"          # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"           # auto (bf16 on a capable GPU, else fp32) | float32 | bfloat16 | float16
compile = False
seed = 1337
# -----------------------------------------------------------------------------
config_given = set()     # the keys a config file or --key=value set
config = configure(globals(), given=config_given)
MODEL_KEYS = [f.name for f in GPTConfig.__dataclass_fields__.values() if f.name != "vocab_size"]
# A resume continues the checkpoint's run: every setting comes from its stored config, and one given here that
# differs is refused, except options.RESUME_FREE's (how far, how often or where the run goes, not what it computes);
# options.INVOCATION's say what this command does and are never restored.
master = int(os.environ.get("RANK", "0")) == 0  # DDP: rank 0 writes the out_dir (set again below, with the rest)


def say(*a, **k):
    if master:
        print(*a, **k)


def restore_run_config(stored, iter_num):
    """Resume: the checkpoint's value for every key that defines the run; a different value given for one of them
    is a one-line error naming the key and both values (RESUME_FREE keys given here win)."""
    restored = []
    for k, v in stored.items():
        if k not in config or k in INVOCATION or config[k] == v:
            continue
        if k in config_given:
            if k in RESUME_FREE or k == "warmup_iters" and iter_num >= max(v, config[k]):
                continue
            raise SystemExit(f"resume error: {k}={config[k]!r} was given but the run in {out_dir} was trained with "
                             f"{k}={v!r}; drop --{k} (a resume continues the run with its own settings), or start a new "
                             f"run: another --out_dir, or --init_from={out_dir} to fine-tune from it")
        restored.append(f"{k}={v!r}")
        config[k] = globals()[k] = v
    if restored:
        say(f"resume: from the checkpoint's config: {', '.join(restored)}")


# Every option checked in one place before anything is read or written (options.check_train_options); then who
# writes out_dir: --eval_only reads the run's checkpoint and writes nothing; a training locks an existing out_dir
# first (a new one once everything is checked), then tidies what a killed process left there, so that two trainings
# never write one folder.
check_train_options(config)
resume = init_from == "resume" or eval_only
lock = None
if not eval_only:
    if master and os.path.isdir(out_dir):
        lock = lock_out_dir(out_dir)
        for line in tidy_run_dir(out_dir):
            say(f"{out_dir}: {line}")
ckpt = load_checkpoint(out_dir) if resume else None  # on the CPU: the model and optimizer move to the device below
if resume:
    restore_run_config(ckpt["config"], ckpt["iter_num"])


def get_lr(it):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    """Mean loss per token over a fixed set of windows of each split (every rank computes the same numbers). On a
    retrieval dataset also, on the val windows, the loss of the text alone and the answers' loss, per-character and
    exact-match accuracy (retrieval.answer_stats: the answers are found in the tokens)."""
    eval_model.eval()
    out, stats = {}, None
    for split, parts in (("train", train_parts), ("val", val_parts)):
        locs, total, count = even_windows(parts, eval_iters * batch_size, block_size, window_align), 0.0, 0
        for i in range(0, len(locs), batch_size):
            X, Y = get_batch(parts, locs[i:i + batch_size], block_size, device)
            with ctx:
                logits, loss = eval_model(X, Y, reduction="sum")
            total, count = total + loss.item(), count + Y.numel()
            if task is not None and split == "val":
                batch = answer_stats(logits, X, Y, meta["stoi"], task.key_len)
                stats = batch if stats is None else [a + b for a, b in zip(stats, batch, strict=True)]
        out[split] = total / count
    if stats is not None:
        n_ans, ans_loss, ans_right, n_q, q_right, n_text, text_loss = stats
        out |= {"text": text_loss / max(n_text, 1), "answer_loss": ans_loss / n_ans if n_ans else math.nan,
                "answer_char": ans_right / n_ans if n_ans else math.nan, "answer_exact": q_right / n_q if n_q else math.nan}
    eval_model.train()
    return out


# DDP: launched by torchrun (RANK, LOCAL_RANK, WORLD_SIZE set), one process per GPU (or CPU process with gloo).
# gradient_accumulation_steps is the global number of micro-batches per step: each rank runs its share, and
# micro-batch m of a step is run by rank m % world_size, so the data of a step does not depend on world size.
ddp = int(os.environ.get("RANK", -1)) != -1
rank, local_rank, world_size = 0, 0, 1
if ddp:
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if gradient_accumulation_steps % world_size:
        raise SystemExit(f"config error: gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple "
                         f"of the number of processes ({world_size}); it counts micro-batches over all ranks")
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    init_process_group(backend="nccl" if "cuda" in pick_device(device) else "gloo")
master = rank == 0
local_micro_steps = gradient_accumulation_steps // world_size
device = pick_device(device)
device_type = "cuda" if "cuda" in device else "cpu"
ctx, dtype = autocast_ctx(device, dtype)
torch.manual_seed(seed + rank)  # different dropout masks per rank; the data order does not use this RNG
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


train_parts, val_parts = load_split(dataset, "train", data_dir), load_split(dataset, "val", data_dir)
finetune_p = parse_reweight_p(finetune_reweight_p, "finetune_reweight_p")
for name, parts in (("train", train_parts), ("val", val_parts)):
    if n_windows(parts, block_size, window_align) < 2:
        raise SystemExit(f"dataset {dataset} {name} split has {sum(map(len, parts))} tokens, too few for windows of "
                         f"block_size+1={block_size + 1}; lower --block_size or prepare more data")
meta = load_meta(dataset, data_dir)
if meta is not None and meta["vocab_size"] < 2:  # (data prepared elsewhere: the prepare scripts refuse it)
    raise SystemExit(f"dataset error: {data_dir_for(dataset, data_dir)}/meta.pkl has a vocabulary of {meta['vocab_size']} "
                     "symbol(s); a language model needs at least 2 (every loss would be 0): prepare a text with more")
vocab_size = model_vocab_size(meta)
task = task_of(meta)  # a retrieval dataset (data/retrieval_char): its answers are logged at every evaluation
if task is not None and (meta["retrieval"]["block_size"] != block_size or window_align != block_size + 1):
    raise SystemExit(f"config error: dataset {dataset} holds whole examples of block_size + 1 = "
                     f"{meta['retrieval']['block_size'] + 1} tokens; train with --block_size="
                     f"{meta['retrieval']['block_size']} --window_align={meta['retrieval']['block_size'] + 1} (as "
                     "config/train_retrieval_char.py does), or prepare the data for this block_size")
if (meta or {}).get("retrieval", {}).get("curriculum") and data_order != "sequential":
    raise SystemExit(f"config error: dataset {dataset} begins with a curriculum of {meta['retrieval']['curriculum']:,} "
                     "examples in order; read it in that order with --data_order=sequential (as "
                     "config/train_retrieval_char_curriculum.py does)")
for name, parts in (("train", train_parts), ("val", val_parts)):  # every token of every shard, not a prefix
    check_token_ids(parts, meta["vocab_size"] if meta else 50257, f"the {name} split in {data_dir_for(dataset, data_dir)}",
                    PREPARE_HINT.get(dataset, f"python data/{dataset}/prepare.py"))
data_fp = data_fingerprint(meta, data_dir_for(dataset, data_dir), train=train_parts, val=val_parts)
ckpt_path = os.path.join(out_dir, "ckpt.pt")


def refuse_another_run():
    if not resume and not overwrite and os.path.exists(ckpt_path):
        raise SystemExit(f"{out_dir} already holds a checkpoint of another run; continue it with --init_from=resume, "
                         "choose another --out_dir, or pass --overwrite=True to replace it")


refuse_another_run()


def check_vocab(ckpt, where, fix):
    if ckpt["model_args"]["vocab_size"] != vocab_size:
        raise SystemExit(f"vocab mismatch: {where} has {ckpt['model_args']['vocab_size']} tokens but dataset {dataset} "
                         f"has {vocab_size}; {fix}")


# The model: its arguments are resolved once by GPTConfig (e.g. attn='lssar' -> 'lssa' with reweight_p=15) and
# stored in that canonical form; resume and fine-tuning take the architecture from the checkpoint.
iter_num, best_val_loss, evaluated = 0, 1e9, True
RUNTIME_KEYS = ("dropout", "attn_backend", "attn_chunk", "attn_dots")  # a fine-tune's own; on resume the checkpoint's (restored)
try:
    asked = GPTConfig(**{k: config[k] for k in MODEL_KEYS}, vocab_size=vocab_size)
    runtime = {k: getattr(asked, k) for k in RUNTIME_KEYS}
    if resume:
        missing = [k for k in ("optimizer", "scaler", "rng", "best_val_loss") if k not in ckpt]
        if missing and not eval_only:
            raise SystemExit(f"checkpoint error: {out_dir} has no {', '.join(missing)} to resume from; fine-tune from "
                             f"it instead: --init_from={out_dir} --out_dir=ANOTHER_DIR")
        check_vocab(ckpt, f"the checkpoint in {out_dir}", "resume on the dataset it was trained on")
        compare_data(ckpt.get("data"), data_fp, f"the run in {out_dir}", "resume error", other_fix="")
        model = model_from_checkpoint(ckpt, device, reader=False, **runtime)
        iter_num, best_val_loss = ckpt["iter_num"], ckpt.get("best_val_loss", 1e9)
        evaluated = ckpt.get("evaluated", True)  # False: saved by a signal before its iteration's evaluation
    elif init_from == "scratch":
        model = GPT(asked).to(device)
    else:  # fine-tune: the architecture and weights of another run, a fresh optimizer and schedule from step 0
        ckpt = load_checkpoint(init_from)
        check_vocab(ckpt, init_from, "fine-tune on data made with the same tokenizer")
        if ckpt.get("data") and ckpt["data"]["vocab"] != data_fp["vocab"]:
            raise SystemExit(f"vocab mismatch: {init_from} was trained with another vocabulary than dataset {dataset}'s "
                             "(the same size, other tokens); fine-tune on data made with the same tokenizer")
        # p has no parameters: the same weights, trained with another second stage
        model = model_from_checkpoint(ckpt, device, reader=False, **runtime,
                                      **({} if finetune_p == "ckpt" else {"reweight_p": finetune_p}))
        say(f"fine-tuning {init_from} (trained {ckpt['iter_num']} iterations)")
        ckpt = None
except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
model_args = asdict(model.config)
checked_config(model_args, device, needs_grad=not eval_only)  # e.g. attn_backend='sdpa' for LSSA: fail before writing
gptconf = model.config
made_out_dir = not os.path.isdir(out_dir)
if master and not eval_only:
    os.makedirs(out_dir, exist_ok=True)
    if lock is None:  # a new out_dir: locked now that everything is checked (a lost race stops here, one line)
        lock = lock_out_dir(out_dir)
        refuse_another_run()  # a run that started and finished meanwhile
# --overwrite=True: the previous run's files wait in out_dir/previous-run until this run has saved a checkpoint,
# and come back if it fails before (here at exit, or at the next start after a kill -9: tidy_run_dir)
aside = master and not resume and overwrite and os.path.exists(ckpt_path)
if aside:
    say(f"overwrite: moved {', '.join(set_aside(out_dir))} of the previous run to {out_dir}/previous-run; deleted once "
        "this run has saved a checkpoint, restored if it stops before")
    atexit.register(lambda: aside and restore_aside(out_dir) and print(
        f"{out_dir}: this run stopped before saving a checkpoint; the previous run is restored"))
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
say(f"tokens per iteration: {tokens_per_iter:,} ({world_size} process(es) x {local_micro_steps} micro-batches x "
    f"{batch_size} x {block_size}) | device {device}"
    + (f" ({torch.get_num_threads()} threads)" if device_type == "cpu" else "")
    + f" | dtype {dtype} | {sum(map(len, train_parts)):,} train tokens")
say(f"model: {model.get_num_params() / 1e6:.2f}M parameters, attention {gptconf.describe()} backend={gptconf.attn_backend}")

scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if resume and not eval_only:
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["cpu"])  # dropout continues exactly where it stopped
    if device_type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
ckpt = None  # free memory
raw_model = model
if compile:
    say("compiling the model... (takes a minute)")
    model = torch.compile(model)
eval_model = model
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

use_wandb = wandb_log and master and not eval_only
if use_wandb:
    import wandb
    try:
        wandb.init(project=wandb_project, name=wandb_run_name, config=config, dir=out_dir)
    except wandb.errors.UsageError as e:  # e.g. no API key: leave no empty out_dir behind
        if made_out_dir and set(os.listdir(out_dir)) <= {LOCK_FILE}:
            shutil.rmtree(out_dir)
        raise SystemExit(f"config error: wandb: {one_line(e).rstrip('.')}; run `wandb login`, set WANDB_MODE=offline, "
                         "or drop --wandb_log") from None

# log.csv: every training step and evaluation. On resume, rows written after the checkpoint by the run that died
# are dropped, so the log reads as one uninterrupted run. --eval_only writes nothing.
log_path = os.path.join(out_dir, "log.csv")
writes = master and not eval_only
ANSWER_COLUMNS = ("text", "answer_loss", "answer_char", "answer_exact")  # retrieval datasets' evaluations (else blank)


def write_log(mode, rows):
    tmp = log_path + ".tmp"
    try:
        with open(tmp if mode == "w" else log_path, mode, newline="") as f:
            csv.writer(f).writerows(rows)
        if mode == "w":
            os.replace(tmp, log_path)
    except OSError as e:  # a full disk: one line (the checkpoints are kept as they are)
        if mode == "w" and os.path.isfile(tmp):
            os.remove(tmp)
        fix = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"fix {out_dir}"
        raise SystemExit(f"log error: could not write {log_path} ({e.strerror or one_line(e)}); {fix} and resume with "
                         "--init_from=resume") from None


if writes:
    rows = []
    if resume and os.path.exists(log_path):
        with open(log_path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        rows = [r for r in rows if int(r[0]) <= iter_num]
    write_log("w", [["iter", "kind", "loss", "val_loss", "lr", "seconds", *(f"val_{k}" for k in ANSWER_COLUMNS)], *rows])


def log_row(*row):
    if writes:
        write_log("a", [row])


def checkpoint(*names, evaluated=True):
    """Everything an exact resume needs: weights, optimizer, scaler, RNG state, iteration (the data position is
    a function of it) and whether its evaluation was done, config, model arguments and the data's fingerprint.
    Written atomically: a crash mid-write keeps the old file. The first save of an --overwrite=True run deletes
    the run it replaces."""
    global aside
    state = {
        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config,
        "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None},
        "evaluated": evaluated, "data": data_fp,
        # what the numbers also depend on: on a CPU the thread count sets the order of the matmuls' sums
        "env": {"torch": torch.__version__, "device": device_type,
                "cpu_threads": torch.get_num_threads() if device_type == "cpu" else None},
    }
    for name in names if master else ():
        save_checkpoint(state, os.path.join(out_dir, name))
        if aside and name == "ckpt.pt":
            drop_aside(out_dir)
            aside = False


# SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption): finish the current step, save, exit 128 + signal.
# A second signal stops at once.
stop_signal = None


def on_signal(signum, frame):
    global stop_signal
    if stop_signal is not None:
        raise KeyboardInterrupt
    stop_signal = signum
    say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to stop at once)", flush=True)


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)


t_start = time.time()
t0 = time.time()
start_iter = iter_num
if resume and evaluated and iter_num >= max_iters and not eval_only:
    say(f"the checkpoint is already at iteration {iter_num} >= max_iters={max_iters}; raise --max_iters to train on")
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    raw_model.reweight_on = iter_num >= reweight_start  # (a function of the step: a resume continues the schedule)

    # a resumed checkpoint's evaluation is in the log already, unless a signal saved it before that evaluation
    done_before = resume and iter_num == start_iter and evaluated
    if eval_only or (iter_num % eval_interval == 0 or iter_num == max_iters) and not done_before:
        losses = estimate_loss()
        say(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}" + (
            f" (text {losses['text']:.4f}; answers: loss {losses['answer_loss']:.3f}, characters right "
            f"{losses['answer_char']:.1%}, queries right {losses['answer_exact']:.1%})" if "text" in losses else ""))
        if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):  # never a number in the log
            raise SystemExit(f"non-finite {'val' if not math.isfinite(losses['val']) else 'train'} loss at step "
                             f"{iter_num}; stopped without saving, the last good checkpoint in {out_dir} is kept (try a "
                             "lower learning_rate)")
        log_row(iter_num, "eval", f"{losses['train']:.6f}", f"{losses['val']:.6f}", lr, f"{time.time() - t_start:.1f}",
                *(f"{losses[k]:.6f}" if k in losses else "" for k in ANSWER_COLUMNS))
        if use_wandb:
            wandb.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr,
                       **{f"val/{k}": losses[k] for k in ANSWER_COLUMNS if k in losses}})
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        if not eval_only and (iter_num > start_iter or resume):
            names = (["ckpt.pt"] if improved or always_save_checkpoint else []) + (["best.pt"] if improved else [])
            checkpoint(*names)
            say(f"saved {' and '.join(names)} to {out_dir}" if names else "val loss did not improve: not saved")
    if eval_only or iter_num >= max_iters:
        break

    # forward/backward with gradient accumulation over micro-batches
    loss_sum = torch.zeros((), device=device)
    for m in range(local_micro_steps):
        micro = m * world_size + rank  # this rank's share of the step's micro-batches
        locs = (random_windows(train_parts, batch_size, block_size, seed, iter_num, micro, window_align)
                if data_order == "random" else
                sequential_windows(train_parts, batch_size, block_size, iter_num, micro, gradient_accumulation_steps,
                                   window_align))
        X, Y = get_batch(train_parts, locs, block_size, device)
        if ddp:  # average gradients across ranks only once, after the last micro-batch
            model.require_backward_grad_sync = m == local_micro_steps - 1
        with ctx:
            _, loss = model(X, Y)
            loss = loss / local_micro_steps
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    if ddp:  # the mean loss over all ranks' micro-batches (and whether any rank was asked to stop)
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        flag = torch.tensor(stop_signal or 0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop_signal = int(flag) or None
    lossf = loss_sum.item()
    if not math.isfinite(lossf):
        raise SystemExit(f"non-finite training loss at step {iter_num + 1}; stopped without saving, "
                         f"the last good checkpoint in {out_dir} is kept (try a lower learning_rate)")
    iter_num += 1
    log_row(iter_num, "train", repr(lossf), "", lr, f"{time.time() - t_start:.1f}")
    if iter_num % log_interval == 0:
        dt = (time.time() - t0) / log_interval
        t0 = time.time()
        eta = dt * (max_iters - iter_num)
        say(f"iter {iter_num}/{max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
              f"{tokens_per_iter / dt:,.0f} tok/s, elapsed {time.time() - t_start:.0f}s, eta {eta:.0f}s")
    if stop_signal is not None:
        checkpoint("ckpt.pt", evaluated=False)  # this iteration's evaluation, if it has one, is redone on resume
        say(f"saved checkpoint at iteration {iter_num} to {out_dir}; continue with --init_from=resume", flush=True)
        if ddp:
            destroy_process_group()
        sys.exit(128 + stop_signal)
if ddp:
    destroy_process_group()
