# The CPU demo with attn="ssmax"; everything else (model, data order, seed, schedule) as in the base config.
from config.train_shakespeare_char import *

out_dir = "out-shakespeare-char-ssmax"
attn = "ssmax"
