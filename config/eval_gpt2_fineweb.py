# Validation loss of the GPT-2 FineWeb runs at 1K..16K tokens (1x..16x the training context), for eval_length.py:
#   python eval_length.py config/eval_gpt2_fineweb.py
# (LSSA is also evaluated with the re-weighting switched on at evaluation only: --reweight_p=ckpt,15 does that
# for every checkpoint.)
ckpts = "out-gpt2-fineweb-softmax,out-gpt2-fineweb-lssa,out-gpt2-fineweb-lssar"
multipliers = "1,2,4,8,16"
tokens = 1048576        # 1M validation tokens at every length (64 windows of 16K)
batch_tokens = 16384    # one 16K window per forward pass
out = "results/gpt2_fineweb/eval_length"
