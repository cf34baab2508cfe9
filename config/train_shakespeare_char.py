# The CPU demo: a small character-level GPT on Tiny Shakespeare, 1-3 minutes per variant on 2 CPU cores.
# Prepare the data first: python data/shakespeare_char/prepare.py. One attention per run, e.g.
#   python train.py config/train_shakespeare_char.py --attn=lssar --out_dir=out-shakespeare-char-lssar
# (sweep.py trains every variant this way, identical except the attention).
out_dir = "out-shakespeare-char"
eval_interval = 250
eval_iters = 10
log_interval = 50
always_save_checkpoint = True

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 16
block_size = 64   # the training context; eval_length.py evaluates 1x..16x of it

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
pos = "rope"
attn = "softmax"
reweight_p = 0.0

learning_rate = 2e-3
max_iters = 1000
lr_decay_iters = 1000
min_lr = 2e-4
warmup_iters = 100
beta2 = 0.99
weight_decay = 0.1
seed = 1337
