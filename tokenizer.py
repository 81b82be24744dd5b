"""
tokenizer.py -- text to token ids and back, with nothing to download.

Three tokenizers, all tiktoken Encodings wrapped in one small class:
  - a Hugging Face tokenizer.json of the byte-level BPE kind (GPT-2, Llama-3, Qwen2/3,
    SmolLM2), rebuilt as a tiktoken Encoding, exactly or not at all (tokenizer_json.py); its
    end-of-sequence and padding ids come from the directory's generation_config.json and
    tokenizer_config.json;
  - GPT-2's BPE, when its files are on this machine: a directory holding the original
    release's vocab.bpe + encoder.json (or Hugging Face's merges.txt + vocab.json), or
    tiktoken's own cache;
  - plain bytes otherwise: ids 0..255 are the bytes, 256 is EOS, 257 is padding. Every
    text has an encoding and the vocabulary is tiny, which suits the built-in task.

Of the rest of the project this file imports only files.py and tokenizer_json.py.
"""

import hashlib
import os
import tempfile

import tiktoken

from files import Fields
from tokenizer_json import translate

# Where tiktoken's own "gpt2" encoding fetches its two files from, and their sha256.
# tiktoken caches each one under sha1(url) in its cache directory; we look there first
# so that get_encoding("gpt2") is only called when it cannot need the network.
_GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# The files a tokenizer directory may be read from (Tokenizer.digest)
FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt",
         "vocab.bpe", "encoder.json")
_announced = set()  # tokenizer names already printed, so we say it once per process


class Templated(str):
    """Text that a chat template wrote (chat.py): a rendered prompt, or an assistant turn as the
    template writes it. It is a str for everyone else; Tokenizer.encode_prompt and
    encode_response encode it with its special tokens. `messages`: the conversation a prompt
    was rendered from (None for a response), for a judge that renders it again its own way.
    finished=False: an answer the model never finished (cut off at a token limit), which
    encode_response ends with no EOS."""

    def __new__(cls, text, messages=None, finished=True):
        self = super().__new__(cls, text)
        self.messages, self.finished = messages, finished
        return self


class Tokenizer:
    """A tiktoken.Encoding plus the ids the rest of selm needs.

    encode(text, allow_special=False) -> list[int]. By default text is plain text: a literal
        "<|endoftext|>" or "<|im_end|>" inside user data is encoded as ordinary characters,
        never as a control token (tokenizer.json's non-special added tokens are still matched,
        as Hugging Face always matches them). allow_special=True turns the text of every
        added/special token into its id, as Hugging Face's tokenizers do by default: for
        prompts written by a chat template. Neither adds a BOS or EOS token; encode_prompt
        and encode_response do.
    decode(ids) -> str: undecodable bytes (a token sequence cut inside a UTF-8 character)
        become U+FFFD instead of raising.
    eos_id: the end-of-sequence id appended to training responses (a chat model's end-of-turn
        token, e.g. <|im_end|>); eos_ids: every id that ends a generation (generation_config
        may list several), eos_id included. bos_id: the token Hugging Face's tokenizer puts
        before every text (Llama-3's <|begin_of_text|>), None if it adds none; encode never
        adds it. name, source: what the tokenizer is and the directory it came from (None:
        built in or tiktoken's cache), for checkpoints.
    """

    def __init__(self, enc, name, eos_id, pad_id, eos_ids=(), source=None, always_special=(), bos_id=None,
                 irregular=None):
        self.enc, self.name, self.eos_id, self.pad_id = enc, name, eos_id, pad_id
        self.eos_ids = frozenset(eos_ids) | {eos_id}
        self.source = None if source is None else os.path.abspath(source)
        self.always_special = frozenset(always_special)  # matched even in plain text (see above)
        self.bos_id = bos_id
        self.irregular = irregular  # an Irregular, for a tokenizer.json tiktoken alone cannot reproduce
        self.vocab_size = enc.n_vocab  # the model may round this up

    def encode(self, text, allow_special=False):
        if self.irregular is not None and self.irregular.touches(text):
            return self.irregular.encode(text, self.enc.special_tokens_set if allow_special else self.always_special)
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        if self.always_special:
            return self.enc.encode(text, allowed_special=self.always_special, disallowed_special=())
        return self.enc.encode_ordinary(text)

    def encode_prompt(self, text):
        """A prompt's ids: BOS first when the tokenizer has one (as the model saw every text
        in pretraining), then the plain text. Text a chat template wrote (Templated) is encoded
        as transformers encodes apply_chat_template's output: special tokens' text as those
        tokens, and no BOS added (a template that wants one writes it, as Llama-3's does)."""
        if isinstance(text, Templated):
            return self.encode(text, allow_special=True)
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(text)

    def encode_response(self, text):
        """A response's ids: the text (plain, or Templated as above), then EOS, unless the text is
        an unfinished answer (Templated with finished=False)."""
        return self.encode(text, allow_special=isinstance(text, Templated)) + (
            [self.eos_id] if getattr(text, "finished", True) else [])

    def digest(self):
        """A short fingerprint of what this tokenizer does: its name, its special ids and the
        files it was read from."""
        h = hashlib.sha256(repr((self.name, sorted(self.eos_ids), self.pad_id, self.bos_id)).encode())
        for name in FILES if self.source else ():
            path = os.path.join(self.source, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    h.update(name.encode() + f.read())
        return h.hexdigest()[:16]

    def decode(self, ids):
        # ids past the tokenizer's vocabulary (a checkpoint's embedding is often padded beyond
        # it, e.g. Qwen2.5's 151936 rows for 151665 tokens) stand for no text
        return self.enc.decode([int(i) for i in ids if int(i) < self.vocab_size], errors="replace")

    def __repr__(self):
        eos = self.eos_id if len(self.eos_ids) == 1 else sorted(self.eos_ids)
        return f"Tokenizer({self.name}, vocab={self.vocab_size}, eos={eos}, pad={self.pad_id})"


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
        raise ValueError(f"{bpe_path}: no tokenizer.json, vocab.bpe+encoder.json or merges.txt+vocab.json here")
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
    """The tokenizer of a directory (bpe_path) if given, else GPT-2's BPE from tiktoken's
    cache if there, else bytes.

    A directory's tokenizer.json wins over GPT-2 release files beside it. Nothing here ever
    downloads. An explicit bpe_path that lacks the files is an error rather than a silent
    fallback. GPT-2: eos = pad = 50256 (masks never use `ids != pad`, see data.py's
    batching). Bytes: ids 0..255 are the bytes, 256 = <|endoftext|> (EOS), 257 = <|pad|>.
    """
    if bpe_path is not None and os.path.isfile(os.path.join(bpe_path, "tokenizer.json")):
        tok = hf_tokenizer(bpe_path)
    elif bpe_path is not None:
        tok = Tokenizer(_gpt2_from_dir(bpe_path), "gpt2", 50256, 50256, source=bpe_path)
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


# ---- Hugging Face directories ---------------------------------------------------------------

def hf_tokenizer(path):
    """A Tokenizer from a Hugging Face directory: its tokenizer.json rebuilt for tiktoken
    (tokenizer_json.translate), plus EOS and padding from generation_config.json and
    tokenizer_config.json."""
    t = translate(path)
    eos_id, eos_ids, pad_id = _eos_and_pad(path, t.enc)
    return Tokenizer(t.enc, t.enc.name, eos_id, pad_id, eos_ids=eos_ids, source=path, bos_id=t.bos_id,
                     always_special=t.always_special, irregular=t.irregular)


def _eos_and_pad(path, enc):
    """(eos_id, eos_ids, pad_id). eos_id is tokenizer_config.json's eos_token, what a chat
    model ends its turn with (<|im_end|>, <|eot_id|>), else generation_config.json's first
    eos_token_id; eos_ids adds every id that generation_config.json stops on. Padding:
    pad_token, else generation_config's pad_token_id, else eos_id."""
    tc, gen = (Fields.of(os.path.join(path, name)) for name in ("tokenizer_config.json", "generation_config.json"))

    def token_id(name):  # the id of tokenizer_config.json's eos_token or pad_token
        token = special_token(tc, name, tc.where)
        if token is None:
            return None
        try:
            return enc.encode_single_token(token)
        except KeyError:
            raise ValueError(f"{tc.where}: field {name!r} names {token!r}, which is not one token") from None

    def is_id(i):
        return type(i) is int and 0 <= i < enc.n_vocab
    ids = f"a token id in [0, {enc.n_vocab})"
    listed = gen.get("eos_token_id", [], lambda v: is_id(v) or type(v) is list and all(map(is_id, v)),
                     f"{ids}, or a list of them")
    listed = [listed] if isinstance(listed, int) else listed
    first = token_id("eos_token")
    eos_ids = ([] if first is None else [first]) + listed
    if not eos_ids:
        raise ValueError(f"{path}: no end-of-sequence token: neither tokenizer_config.json's eos_token "
                         "nor generation_config.json's eos_token_id names one")
    pad = token_id("pad_token")
    pad = gen.get("pad_token_id", None, is_id, ids) if pad is None else pad
    return eos_ids[0], eos_ids, eos_ids[0] if pad is None else pad


def special_token(config, name, where):
    """A special token's text in a tokenizer_config.json (Fields): "<|im_end|>", or older
    files' {"content": "<|im_end|>", ...}; None when it has none."""
    token = config.get(name, None, lambda v: type(v) in (str, dict), "a string or an object with 'content'")
    return Fields(token, where, path=f"{name}.").text("content") if isinstance(token, dict) else token
