# Fine-tune a CPU-demo checkpoint on passkey retrieval (the template in eval_passkey.py), at its training context.
# Stage 1 (this file), then stage 2 (config/finetune_passkey_char_stage2.py, 1,000 more steps); see README:
#   python data/passkey_char/prepare.py
#   python train.py config/finetune_passkey_char.py --init_from=out-shakespeare-char-lssa --out_dir=out-passkey-char-lssa-s1
#   python train.py config/finetune_passkey_char.py --init_from=out-shakespeare-char-lssar --finetune_reweight_p=0 \
#       --out_dir=out-passkey-char-lssar-s1    # LSSAR: stage 1 with the re-weighting off (why: below)
# The architecture and weights come from --init_from; this file sets only the data and the schedule.
# Why 2,500 steps: the demo models cannot copy a key at first (0% at 1x), and the copy circuit appears in a
# sudden transition, not gradually (key-token accuracy ~20% -> ~100% within 100-200 steps), after ~700-1,500
# steps for LSSA and ~1,500 for softmax at this learning rate and batch; a shorter or lower-LR schedule stops
# on the plateau before it.
# Why LSSAR's stage 1 runs with p = 0: with p = 15 it never left the plateau (0% at 1x after this recipe, after a
# 3,000-step run, and trained from scratch on this data): at the answer the key letter's weight after the
# re-weighting is ~1e-15, so no gradient reaches the connection that would find it. With p = 0 (plain LSSA on
# the LSSAR-trained weights) it learns the copy like LSSA does; stage 2 then switches p = 15 back on.
# About 6-9 minutes per model on 2 CPU cores (softmax ~150, LSSA ~160-180 ms/step).
out_dir = "out-passkey-char"
eval_interval = 500
eval_iters = 4
log_interval = 100
always_save_checkpoint = True

dataset = "passkey_char"
batch_size = 32
block_size = 64     # the demo's training context; one example of 65 tokens per window:
window_align = 65   # windows start at example boundaries, so the last 5 targets of every window are its key

learning_rate = 3e-3
max_iters = 2500
lr_decay_iters = 2500
min_lr = 3e-4
warmup_iters = 20
beta2 = 0.99
weight_decay = 0.1
seed = 1337
