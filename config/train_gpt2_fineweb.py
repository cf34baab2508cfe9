# GPT-2 small (124M) on FineWeb sample-10BT, the paper's setup (PAPER.md): RoPE, context 1024, ~0.5M tokens per
# step (16 x 1024 x 32 micro-batches), 18,865 steps (~9.9B tokens, the llm.c GPT-2 124M recipe), AdamW with
# linear warmup and cosine decay. Use one of config/train_gpt2_fineweb_{softmax,lssa,lssar}.py, which import this.
#
#   python data/fineweb/prepare.py                                                  # ~10B tokens -> data/fineweb/
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb_lssar.py   # 8 GPUs, one node
#   python train.py config/train_gpt2_fineweb_lssar.py                              # 1 GPU (32 micro-batches/step)
#
# gradient_accumulation_steps counts micro-batches over all processes (32 = 4 per GPU on 8 GPUs); lower
# batch_size and raise gradient_accumulation_steps to fit smaller GPUs at the same tokens per step.
dataset = "fineweb"
out_dir = "out-gpt2-fineweb"
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = True

batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True
pos = "rope"

learning_rate = 6e-4
max_iters = 18865
lr_decay_iters = 18865
warmup_iters = 700
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

dtype = "auto"      # bf16 autocast on GPUs that support it
compile = True
