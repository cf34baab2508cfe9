# The evaluation of config/eval_gpt2_fineweb.py inside single documents: at 16K tokens almost every window of the
# plain protocol spans several unrelated FineWeb documents, so its "loss at 16x" partly measures how a model copes
# with document boundaries. Here each length L draws its windows only from documents of at least L + 1 tokens
# (split at GPT-2's end-of-text token, which data/fineweb/prepare.py puts before every document), and reports how
# many documents and tokens each length used (long documents are rare: the longest lengths rest on few of them).
#   python eval_length.py config/eval_gpt2_fineweb_docs.py
from config.eval_gpt2_fineweb import *

doc_sep = "eot"
min_docs = 8            # warn when a length finds fewer documents than this
tokens = 1048576        # at most 1M tokens per length, from the first long-enough documents on
out = "results/gpt2_fineweb/eval_length_docs"
