import os
import sys

import torch

# the chapters live at the top level; tests import them as plain modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Pin the tokenizer: with tiktoken's cache switched off, get_tokenizer() gives the byte-level
# tokenizer on every machine, whether or not GPT-2's BPE happens to be cached there. Set in
# the environment, so the train.py processes that tests start inherit it.
os.environ["TIKTOKEN_CACHE_DIR"] = ""
torch.set_num_threads(min(2, torch.get_num_threads()))
