# The retrieval mixture (data/retrieval_char: key-value episodes inside Tiny Shakespeare, retrieval.py), trained
# from scratch at T = 64 with the CPU demo's model. Prepare the data first: python data/retrieval_char/prepare.py.
#   python train.py config/train_retrieval_char.py --attn=lssar --out_dir=out-retrieval-char-lssar
# Every window is one whole example (window_align = block_size + 1); the log has the answers' loss and accuracy.
# The recipe (docs/results.md, "Retrieval past the training length"): at T = 128, or with 2e-3, the demo model had not
# started to retrieve after 1,250-2,250 steps; at T = 64 with 1e-3, RoPE softmax went from chance to 97% of the
# queries between steps 750 and 2,000.
out_dir = "out-retrieval-char"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = True

dataset = "retrieval_char"
gradient_accumulation_steps = 1
batch_size = 32
block_size = 64
window_align = 65

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
pos = "rope"
attn = "softmax"
reweight_p = 0.0

learning_rate = 1e-3
max_iters = 3000
lr_decay_iters = 3000
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99
weight_decay = 0.1
seed = 1337
