# GPT-2 small on FineWeb with attn="lssar"; everything else as in config/train_gpt2_fineweb.py.
from config.train_gpt2_fineweb import *

out_dir = "out-gpt2-fineweb-lssar"
attn = "lssar"  # = attn="lssa" with reweight_p=15
