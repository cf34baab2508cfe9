# GPT-2 small on FineWeb with attn="lssa"; everything else as in config/train_gpt2_fineweb.py.
from config.train_gpt2_fineweb import *

out_dir = "out-gpt2-fineweb-lssa"
attn = "lssa"
