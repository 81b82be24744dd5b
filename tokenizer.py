"""
tokenizer.py -- text to token ids and back, with nothing to download.

Three tokenizers, all tiktoken Encodings wrapped in one small class:
  - a Hugging Face tokenizer.json of the byte-level BPE kind (GPT-2, Llama-3, Qwen2/3,
    SmolLM2), rebuilt as a tiktoken Encoding from its vocabulary, merges, pre-tokenization
    regex and added tokens; its end-of-sequence and padding ids come from the directory's
    generation_config.json and tokenizer_config.json. What a published file does beyond
    tiktoken (an NFC normalizer; single bytes missing from the vocabulary) is done in Python
    around tiktoken's BPE, for the texts it touches (Irregular). A tokenizer.json that cannot
    be reproduced exactly (SentencePiece, another normalizer, ids out of merge order, ...)
    is an error, never a silently different tokenization;
  - GPT-2's BPE, when its files are on this machine: a directory holding the original
    release's vocab.bpe + encoder.json (or Hugging Face's merges.txt + vocab.json), or
    tiktoken's own cache;
  - plain bytes otherwise: ids 0..255 are the bytes, 256 is EOS, 257 is padding. Every
    text has an encoding and the vocabulary is tiny, which suits the built-in task.

Of the rest of the project this file imports only files.py.
"""

import hashlib
import os
import re
import tempfile
import unicodedata

import tiktoken

from files import Fields, read_json

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


# ---- Hugging Face tokenizer.json -------------------------------------------------------

# GPT-2's pre-tokenization split: the ByteLevel pre-tokenizer's own when use_regex is on.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits (each number character a piece of its own) and then GPT-2's split, as SmolLM2 and
# StarCoder chain them, as one regex: nothing else crosses a number character, and whitespace
# just before one ends like whitespace at the end of a text, hence the lookahead (?![^\s\p{N}]).
_DIGITS_GPT2_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def _byte_of_char():
    """Byte-level BPE files spell the 256 bytes as printable characters (GPT-2's
    bytes_to_unicode): printable Latin-1 bytes stand for themselves, the other 68 bytes take
    the characters 256, 257, ... in byte order. Returns that character -> byte map."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _split_pattern(pre, where):
    """The regex whose matches are the pieces that tokenizer.json's pre_tokenizer cuts text
    into, before each piece is mapped to byte-level characters."""
    steps = (pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else [pre]) or [{}]
    steps = [s or {} for s in steps]
    kinds = [s.get("type") for s in steps]
    *first, last = steps
    if last.get("type") == "ByteLevel" and not last.get("add_prefix_space"):
        if not first and last.get("use_regex", True):
            return _GPT2_SPLIT  # GPT-2
        if kinds[:-1] == ["Split"] and not last.get("use_regex", True):  # Llama-3, Qwen2/3
            split = first[0]
            isolated = split.get("behavior") == "Isolated" and not split.get("invert")
            if "Regex" in split.get("pattern", {}) and isolated:
                return split["pattern"]["Regex"]
        if kinds[:-1] == ["Digits"] and last.get("use_regex", True):  # SmolLM2
            if first[0].get("individual_digits"):
                return _DIGITS_GPT2_SPLIT
            return _DIGITS_GPT2_SPLIT.replace(r"\p{N}|", r"\p{N}+|", 1)  # runs of digits
    raise ValueError(f"{where}: pre-tokenizer {' + '.join(map(str, kinds))} (with these options) is not one "
                     "tiktoken can reproduce: byte-level BPE with a regex split is needed")


# Bytes that no UTF-8 text holds: a vocabulary may lack them at no cost.
_NEVER_IN_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])


class Irregular:
    """What a published byte-level BPE tokenizer.json may ask beyond tiktoken, done in Python
    around tiktoken's own BPE for the texts it touches (touches(text)); other texts take
    tiktoken's path unchanged.

    - Single bytes missing from the vocabulary (SmolLM2's lacks 21: 192, 193, 241, 242,
      245-255 and the control bytes 4, 6, 19, 20, 22, 29). Hugging Face's BPE splits the text
      first, then drops each byte it has no token for, or writes the model's unk token in its
      place (one per run of such bytes when fuse_unk); the rest of the piece merges as if the
      byte were not there. tiktoken would panic: a Rust PanicException, a BaseException that
      `except Exception` lets through.
    - An NFC normalizer (Qwen2, Qwen2.5, Qwen3): Hugging Face cuts out the added tokens that
      match the raw text, normalizes the text between them, then cuts out the added tokens
      marked `normalized`, which match the normalized text.
    """

    def __init__(self, enc, pattern, missing, unk_id=None, fuse_unk=False, nfc=False, normalized=()):
        import regex  # tiktoken's own dependency; Python's re lacks \p{L}
        self.enc, self.unk_id, self.fuse_unk, self.nfc = enc, unk_id, fuse_unk, nfc
        self.normalized = frozenset(normalized) if nfc else frozenset()  # added tokens matched after NFC
        self.missing = bytes(sorted(missing))
        self.missing_occurs = any(b not in _NEVER_IN_UTF8 for b in self.missing)
        if self.missing:
            self.missing_run = re.compile(b"([" + b"".join(re.escape(bytes([b])) for b in self.missing) + b"]+)")
        self.split = regex.compile(pattern)
        self._cutters = {}

    def touches(self, text):
        return (self.nfc and not unicodedata.is_normalized("NFC", text)) or self._holds_missing(text)

    def _holds_missing(self, text):
        return self.missing_occurs and self.missing_run.search(text.encode("utf-8", "surrogatepass")) is not None

    def encode(self, text, allowed):
        """Ids of text, the added tokens in `allowed` matched as tokens."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: mended as tiktoken's Encoding.encode mends them
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids, allowed = [], frozenset(allowed)
        for part, is_token in self._cut(text, allowed - self.normalized):
            if is_token:
                ids.append(self.enc.encode_single_token(part))
                continue
            part = unicodedata.normalize("NFC", part) if self.nfc else part
            for sub, is_token in self._cut(part, allowed & self.normalized):
                ids += [self.enc.encode_single_token(sub)] if is_token else self._plain(sub)
        return ids

    def _cut(self, text, tokens):
        """(part, is_token) pairs: text cut at the leftmost, longest matches of `tokens`."""
        if tokens not in self._cutters:
            alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
            self._cutters[tokens] = re.compile(alternatives) if tokens else None
        start, cutter = 0, self._cutters[tokens]
        for m in cutter.finditer(text) if cutter else ():
            if m.start() > start:
                yield text[start:m.start()], False
            yield m.group(), True
            start = m.end()
        if start < len(text):
            yield text[start:], False

    def _plain(self, text):
        """Text without added tokens: tiktoken's split and BPE, except in the pieces that hold a
        missing byte."""
        if not self._holds_missing(text):
            return self.enc.encode_ordinary(text)
        ids = []
        for piece in self.split.findall(text):  # tiktoken's split, by the regex package
            piece = piece.encode("utf-8")
            if self.unk_id is None:  # the missing bytes dropped: the rest merges across the gap
                piece = piece.translate(None, self.missing)
                ids += self.enc._encode_single_piece(piece) if piece else []  # BPE, no split
                continue
            for i, run in enumerate(self.missing_run.split(piece)):  # the unk token stands between
                if i % 2 == 0:  # bytes the vocabulary has, on which tiktoken cannot panic
                    ids += self.enc._encode_single_piece(run) if run else []
                else:
                    ids += [self.unk_id] * (1 if self.fuse_unk else len(run))
        return ids


def hf_tokenizer(path):
    """A Tokenizer from a Hugging Face directory: tokenizer.json (byte-level BPE) plus EOS and
    padding from generation_config.json / tokenizer_config.json.

    tiktoken splits text with one regex, maps each piece to bytes and merges adjacent parts
    lowest rank first, the rank being the merged token's id. That is Hugging Face's BPE
    exactly when the merges are applied in id order, so ids out of merge order are refused,
    as is every pre- or post-processing step that neither tiktoken nor Irregular reproduces.
    byte_fallback and the unk token act only on bytes the vocabulary lacks: they are checked
    only then.
    """
    where = os.path.join(path, "tokenizer.json")
    tj = read_json(where)
    check_tokenizer_json(tj, where)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: a {model.get('type')} model (SentencePiece-style?) is not byte-level BPE, "
                         "which is all tiktoken can reproduce")
    nfc = _is_nfc(tj.get("normalizer"), where)
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{where}: a decoder other than ByteLevel changes the text (SentencePiece-style?); "
                         "tiktoken cannot reproduce it")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{where}: BPE dropout / subword affixes are not reproducible by tiktoken")
    pattern = _split_pattern(tj.get("pre_tokenizer"), where)
    vocab, byte_of = model["vocab"], _byte_of_char()
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise ValueError(f"{where}: added token {t['content']!r} strips whitespace or matches whole "
                             "words only, which tiktoken cannot reproduce")
    # a token that is a prefix of another: tiktoken may match either, Hugging Face the longest
    names = sorted(added)
    for a, b in zip(names, names[1:]):
        if b.startswith(a):
            raise ValueError(f"{where}: added token {a!r} is a prefix of {b!r}; tiktoken may match either")
    ranks = {}
    for piece, i in vocab.items():
        if piece in added:
            continue
        try:
            ranks[bytes(byte_of[c] for c in piece)] = i
        except KeyError:
            raise ValueError(f"{where}: vocabulary entry {piece!r} is not byte-level") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    unk = model.get("unk_token")
    if missing and model.get("byte_fallback"):
        raise ValueError(f"{where}: byte_fallback writes <0x..> tokens for the {len(missing)} single bytes the "
                         "vocabulary lacks; tiktoken cannot reproduce it")
    if missing and unk is not None and unk not in vocab:
        raise ValueError(f"{where}: the unk token {unk!r} is not in the vocabulary")
    last, made = -1, set()
    for n, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or a not in vocab or b not in vocab:
            raise ValueError(f"{where}: merge {n} ({a!r} {b!r}) involves a token the vocabulary lacks")
        if i < last:  # several merges may make one token (Llama-3 lists every split), hence <
            raise ValueError(f"{where}: token ids are not in merge order (merge {n} makes id {i} after id "
                             f"{last}); tiktoken merges by id, so it would tokenize differently")
        last = i
        made.add(i)
    unmade = [p for p, i in vocab.items() if p not in added and len(p) > 1 and i not in made]
    if unmade:
        raise ValueError(f"{where}: vocabulary entry {unmade[0]!r} is made by no merge; tiktoken could "
                         "produce it where Hugging Face never does")
    try:
        enc = tiktoken.Encoding(name=os.path.basename(os.path.normpath(path)), pat_str=pattern,
                                mergeable_ranks=ranks, special_tokens={c: t["id"] for c, t in added.items()})
    except ValueError as e:  # e.g. a regex tiktoken's engine does not accept
        raise ValueError(f"{where}: tiktoken cannot use it: {e}") from None
    irregular = None
    if missing or nfc:
        irregular = Irregular(enc, pattern, missing, unk_id=vocab.get(unk) if unk is not None else None,
                              fuse_unk=model.get("fuse_unk", False), nfc=nfc,
                              normalized=[c for c, t in added.items() if t.get("normalized", not t.get("special"))])
    eos_id, eos_ids, pad_id = _eos_and_pad(path, enc)
    return Tokenizer(enc, enc.name, eos_id, pad_id, eos_ids=eos_ids, source=path,
                     bos_id=_bos(tj, where, enc.n_vocab),
                     always_special=[c for c, t in added.items() if not t.get("special")], irregular=irregular)


def _is_nfc(normalizer, where):
    """True for an NFC normalizer (alone, or in a Sequence), False for none; any other
    normalizer changes the text in ways tiktoken has no equivalent for."""
    steps = normalizer.get("normalizers", []) if normalizer and normalizer.get("type") == "Sequence" else \
        [normalizer] if normalizer else []
    kinds = [s.get("type") for s in steps]
    if kinds not in ([], ["NFC"]):
        raise ValueError(f"{where}: normalizer {' + '.join(map(str, kinds))} changes the text in ways tiktoken "
                         "cannot reproduce (SentencePiece-style?); byte-level BPE with no normalizer or NFC is needed")
    return kinds == ["NFC"]


def _bos(tj, where, n_vocab):
    """The id a TemplateProcessing post-processor puts before a single text, if any: the first
    of the ids its special_tokens give the token that begins its "single" template, which must
    be there (check_tokenizer_json has checked the fields' types)."""
    pp = tj.get("post_processor") or {}
    for j, p in enumerate(pp.get("processors", [pp])):
        first = (p.get("single") or [{}])[0] if p.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first:
            field = "post_processor" + (f".processors.{j}" if "processors" in pp else "")
            name = first["SpecialToken"]["id"]
            ids = (p.get("special_tokens") or {}).get(name, {}).get("ids")
            if not ids or ids[0] >= n_vocab:
                gives = f"id {ids[0]}, not in [0, {n_vocab})" if ids else "no ids"
                raise ValueError(f"{where}: field '{field}.single' begins with special token {name!r}, to which "
                                 f"'{field}.special_tokens' gives {gives}")
            return ids[0]
    return None


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


def check_tokenizer_json(tj, where):
    """Every field of a tokenizer.json that hf_tokenizer reads, of the type it needs."""
    def objects(v):
        return type(v) is dict
    f = Fields(tj, where)
    model = f.nested("model")
    model.get("vocab", ..., lambda v: type(v) is dict and all(type(i) is int and i >= 0 for i in v.values()),
              "an object of tokens and their ids (integers >= 0)")
    model.array("merges", lambda m: type(m) is str and " " in m or type(m) is list and len(m) == 2
                and all(type(x) is str for x in m), 'a list of merges, each "a b" or ["a", "b"]')
    for i, t in enumerate(f.array("added_tokens", objects, "a list of objects")):
        token = Fields(t, where, path=f"added_tokens.{i}.")
        token.text("content")
        token.count("id", lo=0)
    f.nested("decoder")
    pre = f.nested("pre_tokenizer")
    for j, step in enumerate(pre.array("pretokenizers", objects, "a list of objects")):
        Fields(step, where, path=f"pre_tokenizer.pretokenizers.{j}.").nested("pattern").text("Regex", None)
    post = f.nested("post_processor")  # its special tokens' ids give the BOS (_bos)
    processors = [post] + [Fields(p, where, path=f"post_processor.processors.{j}.")
                           for j, p in enumerate(post.array("processors", objects, "a list of objects"))]
    for p in processors:
        special = p.nested("special_tokens")
        for name in special.obj:
            special.nested(name).array("ids", lambda i: type(i) is int and i >= 0, "a list of token ids")
        for k, piece in enumerate(p.array("single", objects, "a list of objects")):
            Fields(piece, where, path=f"{p.path}single.{k}.").nested("SpecialToken").text("id", None)


def special_token(config, name, where):
    """A special token's text in a tokenizer_config.json (Fields): "<|im_end|>", or older
    files' {"content": "<|im_end|>", ...}; None when it has none."""
    token = config.get(name, None, lambda v: type(v) in (str, dict), "a string or an object with 'content'")
    return Fields(token, where, path=f"{name}.").text("content") if isinstance(token, dict) else token
