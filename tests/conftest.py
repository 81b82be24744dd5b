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


# ---- shared by the sampler's tests (test_sample.py, test_llama.py) ----------------------------

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]  # ragged: left padding differs per row


def greedy_reference(m, prompt, n):
    """Recompute-everything greedy decoding of one prompt: the slow, obviously right way."""
    seq, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            t = int(m(torch.tensor([seq]))[0, -1].argmax())
        out.append(t)
        seq.append(t)
    return out
