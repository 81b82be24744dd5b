"""
tokenizer.py -- text to token ids and back, with nothing to download.

Two tokenizers, both tiktoken Encodings wrapped in one small class:
  - GPT-2's BPE, when its files are on this machine: a directory holding the original
    release's vocab.bpe + encoder.json (or Hugging Face's merges.txt + vocab.json), or
    tiktoken's own cache;
  - plain bytes otherwise: ids 0..255 are the bytes, 256 is EOS, 257 is padding. Every
    text has an encoding and the vocabulary is tiny, which suits the built-in task.

This file knows nothing of the rest of the project.
"""

import hashlib
import os
import tempfile

import tiktoken

# Where tiktoken's own "gpt2" encoding fetches its two files from, and their sha256.
# tiktoken caches each one under sha1(url) in its cache directory; we look there first
# so that get_encoding("gpt2") is only called when it cannot need the network.
_GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
_announced = set()  # tokenizer names already printed, so we say it once per process


class Tokenizer:
    """A tiktoken.Encoding plus the ids the rest of selm needs.

    encode(text) -> list[int]: plain text only; a literal "<|endoftext|>" inside user
        text is encoded as ordinary characters, never as the EOS id.
    decode(ids) -> str: undecodable bytes (a token sequence cut inside a UTF-8 character)
        become U+FFFD instead of raising.
    """

    def __init__(self, enc, name, eos_id, pad_id):
        self.enc, self.name, self.eos_id, self.pad_id = enc, name, eos_id, pad_id
        self.vocab_size = enc.n_vocab  # the model may round this up

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids], errors="replace")

    def __repr__(self):
        return (f"Tokenizer({self.name}, vocab={self.vocab_size}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


def _gpt2_in_cache():
    """True when both GPT-2 files sit in tiktoken's cache with the right hashes.
    A present-but-corrupt file would make tiktoken delete it and download again."""
    # the cache directory as tiktoken.load.read_file_cached finds it; "" = no cache
    default = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", default))
    for url, sha256 in _GPT2_FILES.items():
        path = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())
        if not cache or not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                return False
    return True


def _gpt2_from_dir(bpe_path):
    """GPT-2 BPE from a local directory holding the original release's vocab.bpe +
    encoder.json, or the same two files under Hugging Face's names merges.txt + vocab.json."""
    for merges, vocab in (("vocab.bpe", "encoder.json"), ("merges.txt", "vocab.json")):
        m, v = os.path.join(bpe_path, merges), os.path.join(bpe_path, vocab)
        if os.path.isfile(m) and os.path.isfile(v):
            break
    else:
        raise ValueError(f"{bpe_path}: no vocab.bpe+encoder.json (or merges.txt+vocab.json) here")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    # tiktoken would copy even local files into its cache under sha1(path), and later
    # serve that copy if the file changed; an empty cache dir switches the cache off.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(m, v)
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def get_tokenizer(bpe_path=None, verbose=True):
    """GPT-2 BPE if available locally (bpe_path, else tiktoken's cache), else bytes.

    Nothing here ever downloads. An explicit bpe_path that lacks the files is an error
    rather than a silent fallback. GPT-2: eos = pad = 50256 (masks never use `ids != pad`,
    see data.py's batching). Bytes: ids 0..255 are the bytes, 256 = <|endoftext|> (EOS), 257 = <|pad|>.
    """
    if bpe_path is not None:
        tok = Tokenizer(_gpt2_from_dir(bpe_path), "gpt2", 50256, 50256)
    elif _gpt2_in_cache():
        tok = Tokenizer(tiktoken.get_encoding("gpt2"), "gpt2", 50256, 50256)
    else:
        enc = tiktoken.Encoding(  # pat_str: anything covering all text, there are no merges
            name="bytes", pat_str=r"\s+|\S+", mergeable_ranks={bytes([i]): i for i in range(256)},
            special_tokens={"<|endoftext|>": 256, "<|pad|>": 257}, explicit_n_vocab=258)
        tok = Tokenizer(enc, "bytes", 256, 257)
    if verbose and tok.name not in _announced:
        _announced.add(tok.name)
        print(f"tokenizer: {tok}")
    return tok
