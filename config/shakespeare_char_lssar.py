# The CPU demo with attn="lssar"; everything else (model, data order, seed, schedule) as in the base config.
from config.train_shakespeare_char import *

out_dir = "out-shakespeare-char-lssar"
attn = "lssar"  # = attn="lssa" with reweight_p=15
