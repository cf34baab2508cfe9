# The retrieval mixture with a distance curriculum: config/train_retrieval_char.py's recipe on data whose first 48,000
# training windows (the first 1,500 steps) hold near episodes, each query after its own pair at a distance that grows
# over them from one pair's length to the whole window, read in the order stored (data_order = "sequential").
#   python data/retrieval_char/prepare.py --out_dir=data/retrieval_char_curriculum --curriculum=48000
#   python train.py config/train_retrieval_char_curriculum.py --attn=lssar --out_dir=out-rc-lssar
# Why (docs/results.md, "A distance curriculum"): without it FoX (also with its gates started open, gate_bias=4) and
# LSSAR with p = 15 from step 0 never learned the copy; with it both read (one seed each). The adjacent episodes also
# teach "copy the nearest pair": RoPE softmax reaches only 36% with it (100% without), stick-breaking keeps that
# shortcut; other kinds: prepare.py --near.
from config.train_retrieval_char import *  # the same model, batch, schedule and steps: only the data differ

out_dir = "out-retrieval-char-curriculum"
dataset = "retrieval_char_curriculum"
data_order = "sequential"
